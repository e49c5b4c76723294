"""Checkpoints -> our model: tensor names and layouts, placed on the device one tensor at a
time (docs/design.md: loading checkpoints).

Sources: a local directory (config.json + *.safetensors), a hub id (downloaded when the
network allows), a GGUF file (dequantized with the gguf package), or a packaged model by
name (smartkv_jax/packaged_models.py: "smollm2", "gemma3-270m"), or a known model's shape
with random weights ("random:NAME", smartkv_jax/model_shapes.py).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .checkpoint_files import (
    CheckpointError,
    gguf_architecture,
    gguf_tensors,
    open_gguf,
    safetensors_arrays,
    safetensors_files,
)
from .config import ModelConfig, read_model_config
from .errors import SmartKVError
from .gguf_metadata import gguf_config_and_tokenizer, transformers_load
from .model import Transformer
from .model_shapes import RANDOM_PREFIX, random_model
from .packaged_models import PACKAGED_MODELS, packaged_model_path

DEFAULT_MODEL = "smollm2"
# compute dtypes by name (--dtype); the checkpoint's own dtype is read as stored
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass
class LoadedModel:
    model: Transformer
    tokenizer: object  # a transformers tokenizer; None for random:NAME and weights-only dirs
    source: str

    @property
    def cfg(self) -> ModelConfig:
        return self.model.cfg

    def require_tokenizer(self, instead: str) -> object:
        """The tokenizer, or SmartKVError naming --model when there is none; `instead` says
        what to do then (say "give token ids with --token-ids")."""
        if self.tokenizer is None:
            raise SmartKVError(f"--model {self.source} has no tokenizer; {instead}")
        return self.tokenizer


# Our layer leaf -> (HF name suffix, GGUF name suffix, transpose?)
_LAYER_TENSORS = {
    "attn_norm": ("input_layernorm.weight", "attn_norm.weight", False),
    "wq": ("self_attn.q_proj.weight", "attn_q.weight", True),
    "wk": ("self_attn.k_proj.weight", "attn_k.weight", True),
    "wv": ("self_attn.v_proj.weight", "attn_v.weight", True),
    "bq": ("self_attn.q_proj.bias", "attn_q.bias", False),
    "bk": ("self_attn.k_proj.bias", "attn_k.bias", False),
    "bv": ("self_attn.v_proj.bias", "attn_v.bias", False),
    "q_norm": ("self_attn.q_norm.weight", "attn_q_norm.weight", False),
    "k_norm": ("self_attn.k_norm.weight", "attn_k_norm.weight", False),
    "wo": ("self_attn.o_proj.weight", "attn_output.weight", True),
    "mlp_norm": ("post_attention_layernorm.weight", "ffn_norm.weight", False),
    "w_gate": ("mlp.gate_proj.weight", "ffn_gate.weight", True),
    "w_up": ("mlp.up_proj.weight", "ffn_up.weight", True),
    "w_down": ("mlp.down_proj.weight", "ffn_down.weight", True),
}
# Gemma 3's four norms per layer: the name Llama gives its MLP norm is its post-attention norm
_SANDWICH_TENSORS = {
    "post_attn_norm": ("post_attention_layernorm.weight", "post_attention_norm.weight", False),
    "mlp_norm": ("pre_feedforward_layernorm.weight", "ffn_norm.weight", False),
    "post_mlp_norm": ("post_feedforward_layernorm.weight", "post_ffw_norm.weight", False),
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
    layer_tensors = {**_LAYER_TENSORS, **(_SANDWICH_TENSORS if cfg.sandwich_norms else {})}
    for i in range(cfg.num_layers):
        for leaf, names in layer_tensors.items():
            out[prefix.format(i) + names[col]] = (f"layers/{leaf}", i, names[2])
    return out


@partial(jax.jit, donate_argnums=0)
def _set_layer(buf_LX: jax.Array, x_X: jax.Array, layer: jax.Array) -> jax.Array:
    """buf_LX with row `layer` set to x_X (cast to buf's dtype), in place (donated)."""
    return buf_LX.at[layer].set(x_X.astype(buf_LX.dtype))


class _Placer:
    """Device buffers of the model's weights, filled one checkpoint tensor at a time: the host
    holds one tensor (in the checkpoint's dtype) at once, the device the model in `dtype`."""

    def __init__(self, cfg: ModelConfig, dtype: jnp.dtype, where: str):
        self.cfg, self.dtype, self.where = cfg, dtype, where
        self.shapes = expected_shapes(cfg)
        self.buffers: dict[str, jax.Array] = {}
        self.seen: dict[str, set] = {k: set() for k in self.shapes}

    def put(self, name: str, leaf: str, layer: int | None, array: np.ndarray) -> None:
        if layer in self.seen[leaf]:
            raise CheckpointError(f"{self.where}: tensor {name!r} appears twice")
        want = self.shapes[leaf][1:] if layer is not None else self.shapes[leaf]
        if array.shape != want:
            raise CheckpointError(
                f"{self.where}: tensor {name!r} has shape {array.shape} (after layout change), "
                f"expected {want}"
            )
        x = jax.device_put(np.ascontiguousarray(array))
        if layer is None:
            self.buffers[leaf] = x.astype(self.dtype)
        else:
            if leaf not in self.buffers:
                self.buffers[leaf] = jnp.zeros(self.shapes[leaf], self.dtype)
            self.buffers[leaf] = _set_layer(self.buffers[leaf], x, jnp.int32(layer))
        self.seen[leaf].add(layer)

    def model(self) -> Transformer:
        """The model, after checking that every weight of every layer was given."""
        for leaf, got in self.seen.items():
            need = set(range(self.cfg.num_layers)) if leaf.startswith("layers/") else {None}
            missing = need - got
            if missing:
                layers = "" if missing == {None} else f" for layers {sorted(missing)[:8]}"
                raise CheckpointError(f"{self.where}: checkpoint has no tensor for {leaf}{layers}")
        pure: dict = {"stacks": {0: {}}}
        for key, buf in self.buffers.items():
            if key.startswith("layers/"):
                pure["stacks"][0][key.split("/", 1)[1]] = buf
            else:
                pure[key] = buf
        graph, state = _abstract_state(self.cfg, self.dtype)
        nnx.replace_by_pure_dict(state, pure)
        return nnx.merge(graph, state)


def assemble_model(
    cfg: ModelConfig,
    tensors: Iterator[tuple[str, np.ndarray]],
    *,
    gguf: bool,
    dtype: jnp.dtype = jnp.float32,
    fixup: Callable[[str, np.ndarray], np.ndarray] | None = None,
    where: str = "checkpoint",
) -> Transformer:
    """Place named checkpoint tensors ([out, in] like PyTorch, any float dtype) into our
    model's weights in `dtype`, one at a time; `where` (the file or directory) starts every
    error message."""
    names = _name_map(cfg, gguf)
    placer = _Placer(cfg, dtype, where)
    for name, array in tensors:
        if _IGNORED.match(name):
            continue
        if name not in names:
            raise CheckpointError(
                f"{where}: unknown tensor {name!r} for a {cfg.model_type} checkpoint"
            )
        leaf, layer, transpose = names[name]
        if leaf not in placer.shapes:
            if leaf == "lm_head" and cfg.tie_embeddings:
                continue  # some tied checkpoints still store a copy of the head
            raise CheckpointError(f"{where}: tensor {name!r} is not used by this config ({leaf})")
        if fixup is not None:
            array = fixup(name, array)
        placer.put(name, leaf, layer, array.T if transpose else array)
    return placer.model()


def _unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of q/k rows (rotary pairs) in Llama-family GGUFs.

    llama.cpp stores the rows of each head as (pair, half) where transformers uses
    (half, pair); swapping those two axes back restores the rotate-half layout.
    """
    rows = w.shape[0]
    split = w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:])
    return split.swapaxes(1, 2).reshape(w.shape)


def load_gguf(path: str | os.PathLike, dtype: jnp.dtype = jnp.float32) -> LoadedModel:
    """Load a GGUF file (any quantization the gguf package can dequantize)."""
    path = Path(path)
    header = open_gguf(path)
    arch = gguf_architecture(header)
    hf_config, tokenizer = gguf_config_and_tokenizer(path)
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
        if cfg.norm_plus_one and tensor.endswith("norm.weight"):
            return w - 1.0  # llama.cpp stores Gemma's norms as 1 + w
        return w

    tensors = gguf_tensors(header)
    model = assemble_model(cfg, tensors, gguf=True, dtype=dtype, fixup=fix, where=str(path))
    return LoadedModel(model, tokenizer, str(path))


def load_hf_dir(path: str | os.PathLike, dtype: jnp.dtype = jnp.float32) -> LoadedModel:
    """Load a Hugging Face model directory: config.json + *.safetensors (sharded or not)."""
    path = Path(path)
    cfg = read_model_config(path)
    files = safetensors_files(path)
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
    return transformers_load(
        lambda: AutoTokenizer.from_pretrained(str(path)), path, "its tokenizer"
    )


def model_path(name: str) -> Path:
    """The file or directory a local model name stands for (packaged models by name)."""
    if name in PACKAGED_MODELS:
        return packaged_model_path(name)
    return Path(name)


def load_tokenizer(name: str = DEFAULT_MODEL):
    """Only the tokenizer of a model named as in `load_model` (local sources)."""
    from transformers import AutoTokenizer

    path = model_path(name)
    if path.suffix == ".gguf":
        return gguf_config_and_tokenizer(path)[1]
    return AutoTokenizer.from_pretrained(str(path))


def load_model(name: str = DEFAULT_MODEL, dtype: jnp.dtype = jnp.float32) -> LoadedModel:
    """Load by name: a packaged model ("smollm2", "gemma3-270m"), a known shape with random
    weights ("random:NAME", no tokenizer), a .gguf path, a local HF directory, or a hub id.
    `dtype`: the compute dtype the weights are cast to (random weights are drawn in it)."""
    if name.startswith(RANDOM_PREFIX):
        return LoadedModel(random_model(name.removeprefix(RANDOM_PREFIX), dtype), None, name)
    p = model_path(name)
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

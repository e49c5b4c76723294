"""Public shapes of well-known models (`MODEL_SHAPES`, written from each model's config.json on
the Hugging Face hub) and models of those shapes with random weights (`random_model`, loaded
as `--model random:NAME`): benchmarks at real sizes where the weights cannot be downloaded.

A random model is built by the path real checkpoints take (`Transformer.from_weights`), so
generation, perplexity and benchmarks run on it unchanged; it has no tokenizer. It has no
stop tokens either, so a benchmark decodes every token it asks for. Tests shrink a shape
with `model_shape(name, num_layers=2, ...)` (any ModelConfig field).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .config import ModelConfig, RopeScaling
from .errors import SmartKVError
from .model import Transformer

RANDOM_PREFIX = "random:"  # --model random:NAME

# Llama 3.1 / 3.2's RoPE rule (rope_type "llama3"); only the factor differs between them
_LLAMA3_8B_ROPE = RopeScaling(kind="llama3", factor=8.0, original_max_position=8192)
_LLAMA3_1B_ROPE = RopeScaling(kind="llama3", factor=32.0, original_max_position=8192)
GEMMA3_WINDOW = 1024  # sliding_window of Gemma 3's local layers
GEMMA3_PATTERN = 6  # every 6th layer is global, the 5 before it local


def gemma3_windows(num_layers: int) -> tuple[int, ...]:
    """Gemma 3's per-layer windows: 5 local layers (window 1024), then 1 global (0)."""
    return tuple(0 if (i + 1) % GEMMA3_PATTERN == 0 else GEMMA3_WINDOW for i in range(num_layers))


MODEL_SHAPES: dict[str, ModelConfig] = {
    "llama-3.1-8b": ModelConfig(
        model_type="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=_LLAMA3_8B_ROPE,
        max_position=131072,
    ),
    "llama-3.2-1b": ModelConfig(
        model_type="llama",
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=_LLAMA3_1B_ROPE,
        max_position=131072,
        tie_embeddings=True,
    ),
    "qwen3-8b": ModelConfig(
        model_type="qwen3",
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=12288,
        num_layers=36,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        max_position=40960,
        qk_norm=True,
    ),
    "qwen2.5-0.5b": ModelConfig(
        model_type="qwen2",
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        head_dim=64,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        max_position=32768,
        tie_embeddings=True,
        qkv_bias=True,
    ),
    "gemma3-4b": ModelConfig(  # the text decoder of gemma-3-4b (model_type gemma3_text)
        model_type="gemma3_text",
        vocab_size=262208,
        hidden_size=2560,
        intermediate_size=10240,
        num_layers=34,
        num_heads=8,
        num_kv_heads=4,
        head_dim=256,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        rope_scaling=RopeScaling(kind="linear", factor=8.0),
        max_position=131072,
        tie_embeddings=True,
        layer_windows=gemma3_windows(34),
        local_rope_theta=10000.0,
        qk_norm=True,
        norm_plus_one=True,
        embed_scale=True,
        sandwich_norms=True,
        activation="gelu_tanh",
        query_scale=256.0**-0.5,  # query_pre_attn_scalar 256
    ),
    "smollm2-135m": ModelConfig(
        model_type="llama",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        max_position=8192,
        tie_embeddings=True,
    ),
}


def known_random_models() -> str:
    """ "random:llama-3.1-8b, random:llama-3.2-1b, ...": the names `--model` takes."""
    return ", ".join(RANDOM_PREFIX + name for name in MODEL_SHAPES)


def model_shape(name: str, **overrides) -> ModelConfig:
    """The config of model `name` (a key of MODEL_SHAPES) with `overrides` of any ModelConfig
    field, say num_layers=2, vocab_size=512 to shrink it for a CPU test. A new num_layers
    keeps the windows of the model's first layers unless layer_windows is given too.
    SmartKVError naming the known models for an unknown name."""
    if name not in MODEL_SHAPES:
        raise SmartKVError(f"unknown random model {name!r}; known: {known_random_models()}")
    cfg = MODEL_SHAPES[name]
    if cfg.layer_windows and "num_layers" in overrides and "layer_windows" not in overrides:
        overrides["layer_windows"] = cfg.layer_windows[: overrides["num_layers"]]
    try:
        return dataclasses.replace(cfg, **overrides)
    except TypeError as err:  # a field ModelConfig does not have
        raise SmartKVError(f"model_shape({name!r}): {err}") from None


def random_model(
    name: str, dtype: jnp.dtype = jnp.float32, seed: int = 0, **overrides
) -> Transformer:
    """A model of `name`'s shape (`model_shape(name, **overrides)`) with random weights in
    `dtype`, drawn on the device (N(0, 0.02), norms the identity; model.random_weights)."""
    cfg = model_shape(name, **overrides)
    return Transformer.init_random(cfg, jax.random.PRNGKey(seed), dtype)

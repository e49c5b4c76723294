"""Shared test helpers: tiny transformers models and full-sequence logits from ours."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from smartkv_jax.cache import init_cache
from smartkv_jax.config import ModelConfig
from smartkv_jax.policy_table import PolicyConfig

jax.config.update("jax_default_matmul_precision", "highest")


@partial(jax.jit, static_argnums=(0, 2))
def _chunk_logits(graph, state, policy, tokens_BC, pos_BC, cache, aux):
    model = nnx.merge(graph, state)
    out = model(tokens_BC, pos_BC, cache, policy, aux)
    return model.logits(out.hidden), out.cache


def chunk_logits(graph, state, policy, tokens_BC, pos_BC, cache, aux=None):
    """Logits [B, C, V] of every position of a chunk and the updated cache (jitted)."""
    tokens_BC, pos_BC = jnp.asarray(tokens_BC, jnp.int32), jnp.asarray(pos_BC, jnp.int32)
    return _chunk_logits(graph, state, policy, tokens_BC, pos_BC, cache, aux)


def full_logits(model, tokens_BT: np.ndarray, lengths=None) -> np.ndarray:
    """Logits [B, T, V] from one forward pass of a Transformer over whole (right-padded)
    sequences."""
    b, t = tokens_BT.shape
    lengths = np.full(b, t) if lengths is None else np.asarray(lengths)
    pos = np.where(np.arange(t)[None] < lengths[:, None], np.arange(t)[None], -1)
    policy = PolicyConfig.uniform(model.cfg.num_layers).resolve(t, model.cfg.layer_windows)
    cache = init_cache(model.cfg, policy, b, model.dtype)
    graph, state = nnx.split(model.regroup(cache.bounds))
    return np.asarray(chunk_logits(graph, state, policy, tokens_BT, pos, cache)[0])


def tiny_config(**overrides) -> ModelConfig:
    """A tiny random-weights ModelConfig for tests that need no checkpoint."""
    base = dict(
        model_type="llama",
        vocab_size=53,
        hidden_size=32,
        intermediate_size=48,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        max_position=128,
    )
    return ModelConfig(**{**base, **overrides})


def tiny_hf_config(kind: str = "llama", **overrides):
    """A transformers config small enough to run in a second."""
    transformers = pytest.importorskip("transformers")
    base = dict(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    base.update(overrides)
    cls = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "mistral": transformers.MistralConfig,
        "gemma3_text": transformers.Gemma3TextConfig,
    }[kind]
    return cls(**base)


@pytest.fixture(scope="module")
def hf_model_dir(tmp_path_factory):
    """A tiny random llama saved by transformers, with a word-level tokenizer (fault tests)."""
    from .faults import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(autouse=True, scope="session")
def _no_datasets_progress_bars():
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()

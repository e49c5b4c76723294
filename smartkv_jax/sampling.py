"""Sampling the next token from logits: greedy, temperature, top-k and top-p (nucleus)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 means greedy; top_k 0 and top_p 1.0 disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0 or self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"invalid sampling settings: {self}")


GREEDY = SamplingConfig()


def sample(logits_BV: jax.Array, key: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """Next token per row [B] int32 from float32 logits."""
    if sampling.temperature == 0.0:
        return jnp.argmax(logits_BV, -1).astype(jnp.int32)
    logits = logits_BV / sampling.temperature
    if sampling.top_k:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        logits = _top_p(logits, sampling.top_p)
    return jax.random.categorical(key, logits, -1).astype(jnp.int32)


def _top_p(logits_BV: jax.Array, top_p: float) -> jax.Array:
    """Logits with every token outside the smallest prefix (by probability) whose mass
    reaches top_p set to -inf (the most likely token is always kept)."""
    order = jnp.argsort(-logits_BV, -1)
    sorted_logits = jnp.take_along_axis(logits_BV, order, -1)
    probs = jax.nn.softmax(sorted_logits, -1)
    drop_sorted = (jnp.cumsum(probs, -1) - probs) >= top_p
    rows = jnp.arange(order.shape[0])[:, None]
    drop = jnp.zeros_like(drop_sorted).at[rows, order].set(drop_sorted)
    return jnp.where(drop, -jnp.inf, logits_BV)

"""Jitted generation: chunked prefill, then a decode loop inside one `lax.while_loop`.

Prompts of different lengths are right-padded to a common bucket; every token carries its
own position (-1 = padding), so rows never need aligning and the cache stores positions
per slot. Shapes are bucketed (prompt length to a multiple of the chunk, new tokens to a
power of two) so a session compiles a few programs, not one per prompt or per token.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from . import model
from .cache import KVCache, init_cache
from .config import ModelConfig
from .policy import PolicyConfig


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 means greedy; top_k 0 and top_p 1.0 disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0 or self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"invalid sampling settings: {self}")


@dataclasses.dataclass
class GenerationResult:
    tokens: list[list[int]]  # new tokens per prompt, cut after the first stop token
    prefill_s: float  # chunked prefill + first token (includes compiling on first use)
    decode_s: float  # the decode loop alone (compiled beforehand)
    decode_steps: int  # decode forward passes run (batch rows each)
    cache: KVCache

    @property
    def decode_tokens_per_s(self) -> float:
        """Generated tokens per second over the whole batch, decode phase only."""
        return len(self.tokens) * self.decode_steps / max(self.decode_s, 1e-9)


def sample(logits_BV: jax.Array, key: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """Next token per row [B] int32 from float32 logits."""
    if sampling.temperature == 0.0:
        return jnp.argmax(logits_BV, -1).astype(jnp.int32)
    logits = logits_BV / sampling.temperature
    if sampling.top_k:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        order = jnp.argsort(-logits, -1)
        sorted_logits = jnp.take_along_axis(logits, order, -1)
        probs = jax.nn.softmax(sorted_logits, -1)
        # keep the smallest prefix whose mass reaches top_p (always the first token)
        drop_sorted = (jnp.cumsum(probs, -1) - probs) >= sampling.top_p
        drop = (
            jnp.zeros_like(drop_sorted)
            .at[jnp.arange(order.shape[0])[:, None], order]
            .set(drop_sorted)
        )
        logits = jnp.where(drop, -jnp.inf, logits)
    return jax.random.categorical(key, logits, -1).astype(jnp.int32)


@partial(jax.jit, static_argnums=(1, 2), donate_argnums=(5,))
def forward_chunk(
    params,
    cfg: ModelConfig,
    policy: PolicyConfig,
    tokens_BC,
    pos_BC,
    cache,
    gates=None,
    oracle_LBKC=None,
):
    """One jitted chunk through the model: (hidden [B, C, E], cache)."""
    return model.forward(
        params, cfg, policy, tokens_BC, pos_BC, cache, gates=gates, oracle_LBKC=oracle_LBKC
    )


@partial(jax.jit, static_argnums=(1, 2, 3, 4), donate_argnums=(5,))
def _decode_loop(
    params,
    cfg: ModelConfig,
    policy: PolicyConfig,
    sampling: SamplingConfig,
    stop_tokens: tuple[int, ...],
    cache: KVCache,
    first_B: jax.Array,
    pos_B: jax.Array,
    n_steps: jax.Array,
    key: jax.Array,
    out_BN: jax.Array,
    gates=None,
):
    """Feed back sampled tokens until n_steps are done or every row has stopped."""
    stops = jnp.asarray(stop_tokens or (-1,), jnp.int32)
    params = model.split_for_cache(params, cache)

    def cond(carry):
        i, _, _, _, _, done, _ = carry
        return (i < n_steps) & ~jnp.all(done)

    def body(carry):
        i, tok, pos, cache, key, done, out = carry
        hidden, cache = model.forward(
            params, cfg, policy, tok[:, None], pos[:, None], cache, gates=gates
        )
        key, sub = jax.random.split(key)
        nxt = sample(model.logits(params, cfg, hidden[:, 0]), sub, sampling)
        out = out.at[:, i + 1].set(nxt)
        done = done | jnp.isin(nxt, stops)
        return i + 1, nxt, pos + 1, cache, key, done, out

    done0 = jnp.isin(first_B, stops)
    out_BN = out_BN.at[:, 0].set(first_B)
    carry = (jnp.int32(0), first_B, pos_B, cache, key, done0, out_BN)
    i, _, _, cache, _, _, out = jax.lax.while_loop(cond, body, carry)
    return out, i, cache


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _pow2_at_least(x: int, lo: int = 16) -> int:
    return max(lo, 1 << (max(x, 1) - 1).bit_length())


def prefill(
    params,
    cfg: ModelConfig,
    policy: PolicyConfig,
    prompts: Sequence[Sequence[int]],
    cache: KVCache,
    chunk: int,
    gates=None,
) -> tuple[jax.Array, KVCache]:
    """Feed right-padded prompts chunk by chunk. Returns each row's last hidden [B, E]."""
    lengths = np.array([len(p) for p in prompts])
    padded = _round_up(int(lengths.max()), chunk)
    tokens = np.zeros((len(prompts), padded), np.int32)
    pos = np.full((len(prompts), padded), -1, np.int32)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = p
        pos[b, : len(p)] = np.arange(len(p))
    last = np.zeros((len(prompts), cfg.hidden_size), np.float32)
    last = jnp.asarray(last, params["embed"].dtype)
    for s in range(0, padded, chunk):
        hidden, cache = forward_chunk(
            params,
            cfg,
            policy,
            jnp.asarray(tokens[:, s : s + chunk]),
            jnp.asarray(pos[:, s : s + chunk]),
            cache,
            gates,
        )
        idx = lengths - 1 - s
        here = (idx >= 0) & (idx < chunk)
        if here.any():
            picked = hidden[jnp.arange(len(prompts)), jnp.asarray(np.clip(idx, 0, chunk - 1))]
            last = jnp.where(jnp.asarray(here)[:, None], picked, last)
    return last, cache


def generate(
    params,
    cfg: ModelConfig,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    policy: PolicyConfig | None = None,
    gates=None,
    sampling: SamplingConfig = SamplingConfig(),
    stop_tokens: Sequence[int] | None = None,
    chunk: int = 256,
    seed: int = 0,
) -> GenerationResult:
    """Generate up to `max_new_tokens` for each prompt (lists of token ids).

    `policy` sets each layer's cache policy and capacity; by default every layer keeps the
    whole sequence. Gated layers need `gates` (see smartkv_jax.gates). `stop_tokens`
    defaults to the model's EOS ids.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > cfg.max_position:
        raise ValueError(
            f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
            f"model's context limit of {cfg.max_position} tokens"
        )
    chunk = min(chunk, _pow2_at_least(longest))
    n_out = _pow2_at_least(max_new_tokens)
    max_len = _round_up(_round_up(longest, chunk) + n_out, 256)
    policy = (policy or PolicyConfig.uniform(cfg.num_layers)).resolve(max_len)
    stops = tuple(int(t) for t in (cfg.eos_token_ids if stop_tokens is None else stop_tokens))
    cache = init_cache(cfg, policy, len(prompts), params["embed"].dtype)
    params = model.split_for_cache(params, cache)

    t0 = time.perf_counter()
    last, cache = prefill(params, cfg, policy, prompts, cache, chunk, gates)
    key = jax.random.PRNGKey(seed)
    key, sub = jax.random.split(key)
    first = sample(model.logits(params, cfg, last), sub, sampling)
    first.block_until_ready()
    t1 = time.perf_counter()
    pos = jnp.asarray([len(p) for p in prompts], jnp.int32)
    out0 = jnp.zeros((len(prompts), n_out), jnp.int32)
    args = (params, cfg, policy, sampling, stops)
    # a zero-step call compiles the loop (the step count is traced), so decode_s is pure decoding
    _, _, cache = _decode_loop(*args, cache, first, pos, jnp.int32(0), key, out0, gates)
    jax.block_until_ready(cache)
    t2 = time.perf_counter()
    out, steps, cache = _decode_loop(
        *args, cache, first, pos, jnp.int32(max_new_tokens - 1), key, out0, gates
    )
    out = np.asarray(out)
    t3 = time.perf_counter()
    steps = int(steps)
    tokens = []
    for row in out[:, : steps + 1]:
        row = row.tolist()
        cut = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        tokens.append(row[:cut])
    return GenerationResult(tokens, t1 - t0, t3 - t2, steps, cache)

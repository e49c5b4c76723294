"""Jitted generation: chunked prefill through `chunk_step`, then a decode loop inside one
`lax.while_loop` over a named `DecodeState` (docs/design.md: data flow).

Prompts of different lengths are right-padded to a common bucket; every token carries its
own position (-1 = padding), so rows never need aligning and the cache stores positions
per slot. Shapes are bucketed (prompt length to a multiple of the chunk, new tokens to a
power of two) so a session compiles a few programs, not one per prompt or per token.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .cache import KVCache, init_cache
from .errors import SmartKVError, check_range
from .gates import Gates
from .model import Probe, Transformer
from .policy_table import PolicyConfig
from .sampling import GREEDY, SamplingConfig, sample
from .sharding import model_mesh, place_cache, put_batch, put_replicated
from .step import chunk_step, split_model


@dataclasses.dataclass
class GenerationResult:
    """tokens: new tokens per prompt, cut after the first stop token. prefill_s: chunked
    prefill + first token, compiled beforehand. decode_s: the decode loop alone (compiled
    beforehand). decode_steps: decode forward passes run (batch rows each). probes: with a
    probe, its outputs for each prefill chunk (layer axis first). compile_s: tracing and
    compiling the prefill's chunk step ahead of time (`_compile_prefill`) plus the decode
    loop's zero-step warm-up call; near 0 when a program of the same shapes ran before. On
    CPU, XLA finishes some code generation on a program's first run, which stays in
    prefill_s. prefill_temp_bytes: the working memory of one prefill chunk step beyond its
    inputs and outputs (weights, cache), by XLA's own accounting (None where the backend
    gives none)."""

    tokens: list[list[int]]
    prefill_s: float
    decode_s: float
    decode_steps: int
    cache: KVCache
    probes: list[Any] | None = None
    compile_s: float = 0.0
    prefill_temp_bytes: int | None = None

    @property
    def decode_tokens_per_s(self) -> float:
        """Generated tokens per second over the whole batch, decode phase only."""
        return len(self.tokens) * self.decode_steps / max(self.decode_s, 1e-9)


@partial(
    jax.tree_util.register_dataclass,
    data_fields=["step", "token", "pos", "cache", "key", "done", "out"],
    meta_fields=[],
)
@dataclasses.dataclass
class DecodeState:
    """The decode loop's carry. step: decode steps run (int32). token: last token [B].
    pos: its position [B]. key: PRNG key. done: [B] rows that emitted a stop token.
    out: [B, N] int32 tokens so far (column 0: the first token, from the prefill)."""

    step: jax.Array
    token: jax.Array
    pos: jax.Array
    cache: KVCache
    key: jax.Array
    done: jax.Array
    out: jax.Array


@partial(
    jax.jit, static_argnames=("graph", "policy", "sampling", "stops"), donate_argnames=("state",)
)
def decode_loop(
    graph: nnx.GraphDef,
    params: nnx.State,
    policy: PolicyConfig,
    sampling: SamplingConfig,
    stops: tuple[int, ...],
    state: DecodeState,
    n_steps: jax.Array,
    aux: dict[str, Any] | None = None,
) -> DecodeState:
    """Feed back sampled tokens until n_steps are done or every row has stopped."""
    model = nnx.merge(graph, params)
    stop_ids = jnp.asarray(stops or (-1,), jnp.int32)

    def cond(s: DecodeState):
        return (s.step < n_steps) & ~jnp.all(s.done)

    def body(s: DecodeState) -> DecodeState:
        out = model(s.token[:, None], s.pos[:, None], s.cache, policy, aux)
        key, sub = jax.random.split(s.key)
        nxt = sample(model.logits(out.hidden[:, 0]), sub, sampling)
        return DecodeState(
            step=s.step + 1,
            token=nxt,
            pos=s.pos + 1,
            cache=out.cache,
            key=key,
            done=s.done | jnp.isin(nxt, stop_ids),
            out=s.out.at[:, s.step + 1].set(nxt),
        )

    return jax.lax.while_loop(cond, body, state)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _pow2_at_least(x: int, lo: int = 16) -> int:
    return max(lo, 1 << (max(x, 1) - 1).bit_length())


def _segment_arrays(segment: Sequence[Sequence[int]], start_B: np.ndarray, chunk: int):
    """One segment's rows right-padded to a multiple of `chunk`: tokens and positions
    [B, padded] (positions continue from start_B, -1 = padding)."""
    lengths = np.array([len(p) for p in segment])
    padded = _round_up(max(int(lengths.max()), 1), chunk)
    tokens = np.zeros((len(segment), padded), np.int32)
    pos = np.full((len(segment), padded), -1, np.int32)
    for b, p in enumerate(segment):
        tokens[b, : len(p)] = p
        pos[b, : len(p)] = start_B[b] + np.arange(len(p))
    return tokens, pos, lengths


def prefill(
    model: Transformer,
    policy: PolicyConfig,
    segments: Sequence[Sequence[Sequence[int]]],
    cache: KVCache,
    chunk: int,
    aux: dict[str, Any] | None = None,
    probe: Probe | None = None,
    start_B: np.ndarray | None = None,
) -> tuple[jax.Array, KVCache, list[Any]]:
    """Feed the prompts chunk by chunk. segments[s][b] is row b's part s: each segment
    starts a fresh chunk (say a long context, compressed to the budget before a question is
    read), positions run on across segments from start_B (default 0). Returns the logits
    after each row's last token [B, V], the cache and the probe's outputs per chunk (empty
    without a probe)."""
    graph, state = split_model(model, cache)
    mesh = model_mesh(model)
    rows = len(segments[0])
    start = np.zeros(rows, np.int64) if start_B is None else np.asarray(start_B, np.int64)
    logits, probes = None, []
    for segment in segments:
        tokens, pos, lengths = _segment_arrays(segment, start, chunk)
        for s in range(0, tokens.shape[1], chunk):
            idx = lengths - 1 - s
            out = chunk_step(
                graph,
                state,
                policy,
                put_batch(tokens[:, s : s + chunk], mesh),
                put_batch(pos[:, s : s + chunk], mesh),
                cache,
                aux,
                select_B=put_batch(np.clip(idx, 0, chunk - 1).astype(np.int32), mesh),
                probe=probe,
            )
            cache = out.cache
            here = jnp.asarray((idx >= 0) & (idx < chunk))[:, None]
            logits = out.logits if logits is None else jnp.where(here, out.logits, logits)
            if probe is not None:
                probes.append(out.probes)
        start = start + lengths
    return logits, cache, probes


def _check_request(model: Transformer, prompts, context, max_new_tokens: int, chunk: int) -> int:
    """Longest prompt (with its context) in tokens, after checking the request (SmartKVError
    for a bad one)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise SmartKVError("every prompt needs at least one token")
    if context is not None and len(context) != len(prompts):
        raise SmartKVError(f"{len(context)} contexts for {len(prompts)} prompts")
    check_range("max_new_tokens", max_new_tokens, 1)
    check_range("chunk", chunk, 1)
    longest = max(len(p) + (len(context[i]) if context else 0) for i, p in enumerate(prompts))
    if longest + max_new_tokens > model.cfg.max_position:
        raise SmartKVError(
            f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
            f"model's context limit of {model.cfg.max_position} tokens"
        )
    return longest


def _cut_at_stop(out_BN: np.ndarray, steps: int, stops: tuple[int, ...]) -> list[list[int]]:
    tokens = []
    for row in out_BN[:, : steps + 1].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        tokens.append(row[:cut])
    return tokens


def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    policy: PolicyConfig | None = None,
    gates: Gates | None = None,
    aux: dict[str, Any] | None = None,
    sampling: SamplingConfig = GREEDY,
    stop_tokens: Sequence[int] | None = None,
    chunk: int = 256,
    seed: int = 0,
    context: Sequence[Sequence[int]] | None = None,
    probe: Probe | None = None,
    on_compiled: Callable[[], Any] | None = None,
) -> GenerationResult:
    """Generate up to `max_new_tokens` for each prompt (lists of token ids).

    `policy` sets each layer's cache policy and capacity; by default every layer keeps the
    whole sequence. gates: the lifespan gates gated layers need (smartkv_jax/gates.py); aux:
    any other side input the policy's layers need (say {"oracle": true log4 lifespans
    [L, B, K, T]}). `stop_tokens` defaults to the model's EOS ids. context: text
    read before each prompt in chunks of its own, so the cache is compressed to its budget
    before the prompt is seen. probe: collect a probe's outputs over the prefill chunks.
    on_compiled: called once every program is compiled, before anything runs.
    Raises SmartKVError for an empty prompt, max_new_tokens or chunk < 1, or a request longer
    than the model's context.
    """
    longest = _check_request(model, prompts, context, max_new_tokens, chunk)
    chunk = min(chunk, _pow2_at_least(longest))
    max_len = _round_up(_round_up(longest, chunk) + _pow2_at_least(max_new_tokens), 256)
    policy = (policy or PolicyConfig.uniform(model.cfg.num_layers)).resolve(
        max_len, model.cfg.layer_windows
    )
    cache = init_cache(model.cfg, policy, len(prompts), model.dtype, mesh=model_mesh(model))
    segments = [prompts] if context is None else [context, prompts]
    how = {"sampling": sampling, "stop_tokens": stop_tokens, "chunk": chunk, "seed": seed}
    return continue_generation(
        model,
        cache,
        policy,
        segments,
        np.zeros(len(prompts), np.int64),
        max_new_tokens,
        aux={"gates": gates, **(aux or {})},
        probe=probe,
        on_compiled=on_compiled,
        **how,
    )


def _compile_prefill(
    model: Transformer,
    policy: PolicyConfig,
    cache: KVCache,
    rows: int,
    chunk: int,
    aux: dict[str, Any] | None,
    probe: Probe | None,
) -> tuple[float, int | None]:
    """Seconds spent tracing and compiling `prefill`'s chunk step ahead of time, on inputs
    placed as `prefill` places them ([rows, chunk] tokens and positions, [rows] columns),
    and the step's temporary bytes (XLA's memory analysis; None where there is none); jax
    keeps the program, so the prefill runs it without compiling."""
    mesh = model_mesh(model)
    ids_BC = put_batch(np.zeros((rows, chunk), np.int32), mesh)
    select_B = put_batch(np.zeros(rows, np.int32), mesh)
    graph, state = split_model(model, cache)
    t0 = time.perf_counter()
    lowered = chunk_step.lower(
        graph, state, policy, ids_BC, ids_BC, cache, aux, select_B=select_B, probe=probe
    )
    compiled = lowered.compile()
    seconds = time.perf_counter() - t0
    memory = compiled.memory_analysis()
    return seconds, None if memory is None else int(memory.temp_size_in_bytes)


SHRINK_EVERY = 16  # decode steps between looks for rows that stopped (`_decode`, shrink)


def _gather_rows(state: DecodeState, rows: np.ndarray, mesh) -> DecodeState:
    """The decode state of batch rows `rows` alone: every per-row array and the cache's rows
    (axis 1 of every group leaf) gathered and placed as a fresh batch of that size is (so the
    loop's programs see the shardings they would anyway); the step count and key as they
    were."""
    idx = jnp.asarray(rows)

    def pick(x: jax.Array) -> jax.Array:
        return put_batch(np.asarray(x)[rows], mesh)

    return dataclasses.replace(
        state,
        token=pick(state.token),
        pos=pick(state.pos),
        done=pick(state.done),
        out=pick(state.out),
        cache=place_cache(jax.tree.map(lambda x: jnp.take(x, idx, axis=1), state.cache), mesh),
    )


def _decode(args, state: DecodeState, n_steps: int, aux, mesh, shrink: bool):
    """Run the decode loop up to n_steps; returns (out [B, N] every row's tokens, steps run,
    the last state). With `shrink`, the loop stops every SHRINK_EVERY steps; once at most
    half the rows are still going, those go on alone (in a batch of the next power of two,
    topped up with stopped rows: few batch sizes, so few compiled programs), so rows that
    stopped early stop costing a step. Rows never interact, so each row's tokens are the
    same either way."""
    if not shrink:
        state = decode_loop(*args, state, jnp.int32(n_steps), aux)
        return np.asarray(state.out), int(state.step), state
    out = np.zeros(state.out.shape, np.int32)
    rows = np.arange(out.shape[0])  # the original row of each batch row
    while True:
        upto = min(int(state.step) + SHRINK_EVERY, n_steps)
        state = decode_loop(*args, state, jnp.int32(upto), aux)
        step, done = int(state.step), np.asarray(state.done)
        out[rows] = np.asarray(state.out)
        if step >= n_steps or done.all():
            return out, step, state
        live = np.flatnonzero(~done)
        size = _pow2_at_least(len(live), 1)
        if size <= len(rows) // 2:
            keep = np.concatenate([live, np.flatnonzero(done)[: size - len(live)]])
            state, rows = _gather_rows(state, keep, mesh), rows[keep]


def _decode_state(
    first_B: np.ndarray, ends_B: np.ndarray, cache: KVCache, key, stops, n_out: int, mesh
) -> DecodeState:
    """The decode loop's start from the first tokens [B] at positions ends_B [B]: every array
    placed as the loop's compiled program expects, whether real or a warm-up's."""
    out = np.zeros((len(first_B), n_out), np.int32)
    out[:, 0] = first_B
    return DecodeState(
        step=put_replicated(np.int32(0), mesh),
        token=put_batch(first_B.astype(np.int32), mesh),
        pos=put_batch(ends_B.astype(np.int32), mesh),
        cache=cache,
        key=put_replicated(key, mesh),
        done=put_batch(np.isin(first_B, stops or (-1,)), mesh),
        out=put_batch(out, mesh),
    )


def continue_generation(
    model: Transformer,
    cache: KVCache,
    policy: PolicyConfig,
    segments: Sequence[Sequence[Sequence[int]]],
    start_B: np.ndarray,
    max_new_tokens: int,
    *,
    aux: dict[str, Any] | None = None,
    sampling: SamplingConfig = GREEDY,
    stop_tokens: Sequence[int] | None = None,
    chunk: int = 256,
    seed: int = 0,
    probe: Probe | None = None,
    on_compiled: Callable[[], Any] | None = None,
    shrink: bool = False,
) -> GenerationResult:
    """`generate` from a cache that already holds each row's first `start_B` positions (say
    a context compressed once): `segments` (as `prefill`'s) are read from there on, then up
    to `max_new_tokens` are decoded. `policy` must be resolved for the cache. on_compiled:
    called once every program is compiled, before the prefill runs (the benchmarks start
    their peak-memory count there, so compiling does not count). shrink: rows that stopped
    drop out of the decode batch (`_decode`; for many rows that stop at different times,
    say RULER's answers; `aux` must then hold no per-row arrays, and the result's cache
    holds the last batch's rows and decode_steps the longest row's steps). The model's
    layers are restacked in place for the cache's groups (`Transformer.group_layers`)."""
    cfg = model.cfg
    stops = tuple(int(t) for t in (cfg.eos_token_ids if stop_tokens is None else stop_tokens))
    n_out = _pow2_at_least(max_new_tokens)
    model.group_layers(cache.bounds)  # once, in place, for the compile, prefill and decode
    rows, mesh = len(segments[0]), model_mesh(model)
    compile_s, temp_bytes = _compile_prefill(model, policy, cache, rows, chunk, aux, probe)
    graph, params = split_model(model, cache)
    args = (graph, params, policy, sampling, stops)
    key, sub = jax.random.split(jax.random.PRNGKey(seed))
    # a zero-step call compiles the loop (the step count is traced) and leaves the empty
    # cache as it was, so decode_s is pure decoding
    t = time.perf_counter()
    blank = _decode_state(np.zeros(rows, np.int32), np.zeros(rows), cache, key, stops, n_out, mesh)
    warm = jax.block_until_ready(decode_loop(*args, blank, jnp.int32(0), aux))
    cache, key = warm.cache, warm.key  # the call took (donated) the ones it was given
    compile_s += time.perf_counter() - t
    if on_compiled is not None:
        on_compiled()
    t0 = time.perf_counter()
    logits, cache, probes = prefill(model, policy, segments, cache, chunk, aux, probe, start_B)
    first = np.asarray(sample(logits, sub, sampling))
    t1 = time.perf_counter()
    ends = np.asarray(start_B) + sum(np.array([len(p) for p in seg]) for seg in segments)
    state = _decode_state(first, ends, cache, key, stops, n_out, mesh)
    out, steps, state = _decode(args, state, max_new_tokens - 1, aux, mesh, shrink)
    t2 = time.perf_counter()
    tokens = _cut_at_stop(out, steps, stops)
    return GenerationResult(
        tokens, t1 - t0, t2 - t1, steps, state.cache, probes or None, compile_s, temp_bytes
    )

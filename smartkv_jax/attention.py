"""Attention of a chunk of new queries over a layer's cache plus the chunk itself, and the
attention mass attention-scored policies rank by (docs/design.md: the cache, kernels)."""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from pallas_kernels.decode_attention import decode_attention, reference_decode_attention

from .cache import LayerCache
from .sharding import on_each_shard

CACHE_BLOCK = 256  # slots per block of a chunk's attention over the cache (see blocked_attention)


@dataclasses.dataclass(frozen=True)
class AttentionRule:
    """How one layer's queries see keys (static under jit): logit `scale` and the layer's
    attention `window` W (a query at t sees positions > t - W; 0: every earlier position)."""

    scale: float
    window: int = 0

    def logits(self, q: jax.Array, k: jax.Array, spec: str) -> jax.Array:
        """Scaled float32 logits of einsum `spec` over q and k."""
        return jnp.einsum(spec, q.astype(jnp.float32), k.astype(jnp.float32)) * self.scale

    def chunk_mask(self, pos_BC: jax.Array) -> jax.Array:
        """[B, Cq, Ck] which of the chunk's own keys each query sees (causal, windowed)."""
        q, k = pos_BC[:, :, None], pos_BC[:, None, :]
        ok = (k >= 0) & (k <= q)
        return ok & (k > q - self.window) if self.window else ok

    def slot_mask(self, visible_pos_BKS: jax.Array, pos_BC: jax.Array) -> jax.Array:
        """[B, K, 1, C, S] which cache slots each query sees."""
        s, q = visible_pos_BKS[:, :, None, None, :], pos_BC[:, None, None, :, None]
        ok = (s >= 0) & (s <= q)
        return ok & (s > q - self.window) if self.window else ok


def merge_attention(out_a, lse_a, out_b, lse_b) -> tuple[jax.Array, jax.Array]:
    """Attention over two disjoint sets of keys as one: outputs [B, H, C, D] weighted by their
    log-sum-exps [B, H, C] (-inf: the set was empty for that query)."""
    lse = jnp.logaddexp(lse_a, lse_b)
    safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    w_a = jnp.where(jnp.isfinite(lse_a), jnp.exp(lse_a - safe), 0.0)[..., None]
    w_b = jnp.where(jnp.isfinite(lse_b), jnp.exp(lse_b - safe), 0.0)[..., None]
    return w_a * out_a + w_b * out_b, lse


def _block(cache: LayerCache, visible_pos_BKS: jax.Array, start, size: int):
    """(k, v [B, K, size, D], visible positions [B, K, size]) of slots start .. start+size-1."""
    part = partial(jax.lax.dynamic_slice_in_dim, start_index=start, slice_size=size, axis=2)
    return part(cache.k), part(cache.v), part(visible_pos_BKS)


def _live(pos_BKS: jax.Array, pos_BC: jax.Array) -> jax.Array:
    """Whether any slot of a block holds a position some query of the chunk can see."""
    return jnp.any((pos_BKS >= 0) & (pos_BKS <= jnp.max(pos_BC)))


def _whole(capacity: int) -> int:
    """Slots in whole CACHE_BLOCKs."""
    return capacity - capacity % CACHE_BLOCK


def blocked_attention(
    cache: LayerCache,
    visible_pos_BKS: jax.Array,
    q_BHCD: jax.Array,
    pos_BC: jax.Array,
    rule: AttentionRule,
) -> tuple[jax.Array, jax.Array]:
    """`reference_decode_attention` over the cache, CACHE_BLOCK slots at a time, skipping
    (lax.cond) every block that holds no slot a query of the chunk can see, the rest (and a
    last partial block, when the capacity is not a multiple of CACHE_BLOCK) merged by their
    log-sum-exps: the same result up to float rounding. A chunked prefill finds most of a
    large cache empty (the full cache, early chunks), so this halves its work; and the chunk's
    logits never exist for more than one block ([B, H, C, CACHE_BLOCK]), so the memory a
    chunk step needs stays near the cache's own."""
    b, h, c, d = q_BHCD.shape
    how = {"scale": rule.scale, "window": rule.window}

    def step(acc, start):
        k, v, pos = _block(cache, visible_pos_BKS, start, CACHE_BLOCK)

        def run(acc):
            return merge_attention(
                *acc, *reference_decode_attention(q_BHCD, k, v, pos, pos_BC, **how)
            )

        return jax.lax.cond(_live(pos, pos_BC), run, lambda acc: acc, acc), None

    init = (jnp.zeros((b, h, c, d), jnp.float32), jnp.full((b, h, c), -jnp.inf, jnp.float32))
    whole = _whole(cache.capacity)
    acc = jax.lax.scan(step, init, jnp.arange(0, whole, CACHE_BLOCK))[0]
    if whole == cache.capacity:
        return acc
    tail = _block(cache, visible_pos_BKS, whole, cache.capacity - whole)
    return merge_attention(*acc, *reference_decode_attention(q_BHCD, *tail, pos_BC, **how))


def attend(
    cache: LayerCache,
    visible_pos_BKS: jax.Array,
    q_BHCD: jax.Array,
    k_BKCD: jax.Array,
    v_BKCD: jax.Array,
    pos_BC: jax.Array,
    rule: AttentionRule,
    kernels: str = "reference",
    mesh: Mesh | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Attention of a chunk of C new queries over the cache plus the chunk's own keys.

    The cache part and the causal chunk part are computed separately and merged by their
    log-sum-exps, so the chunk never has to be copied into the cache first.
    kernels: "pallas" (the TPU decode-attention kernel), "interpret" (that kernel in Pallas
    interpret mode) or "reference" (plain jnp; a chunk of several queries over a cache of
    more than one block goes block by block, `blocked_attention`). mesh: the cache's; a
    Pallas kernel then runs on each device's rows and heads (`sharding.on_each_shard`).
    Returns (out_BHCD float32, lse_BHC float32); lse is -inf for padding queries.
    """
    b, h, c, d = q_BHCD.shape
    kh = k_BKCD.shape[1]
    g = h // kh
    args = (q_BHCD, cache.k, cache.v, visible_pos_BKS, pos_BC)
    how = {"scale": rule.scale, "window": rule.window}
    if kernels == "reference" and c > 1 and cache.capacity > CACHE_BLOCK:
        out_c, lse_c = blocked_attention(cache, visible_pos_BKS, q_BHCD, pos_BC, rule)
    elif kernels == "reference":
        out_c, lse_c = reference_decode_attention(*args, **how)
    else:
        kernel = partial(decode_attention, **how, interpret=kernels == "interpret")
        if mesh is not None:
            kernel = on_each_shard(kernel, mesh, b, kh)
        out_c, lse_c = kernel(*args)
    qg = q_BHCD.reshape(b, kh, g, c, d)
    logits = rule.logits(qg, k_BKCD, "bkgqd,bkcd->bkgqc")
    logits = jnp.where(rule.chunk_mask(pos_BC)[:, None, None], logits, -jnp.inf)
    lse_n = jax.nn.logsumexp(logits, axis=-1)  # [B, K, G, Cq]
    safe_n = jnp.where(jnp.isfinite(lse_n), lse_n, 0.0)
    p_n = jnp.exp(logits - safe_n[..., None])
    out_n = jnp.einsum("bkgqc,bkcd->bkgqd", p_n, v_BKCD.astype(jnp.float32))
    return merge_attention(out_c, lse_c, out_n.reshape(b, h, c, d), lse_n.reshape(b, h, c))


def _mass(k_BKSD, visible_BKS, qg_BKGCD, lse_BKGC1, w_B11C1, pos_BC, rule) -> jax.Array:
    """Attention probability [B, K, S] each slot of k_BKSD receives, summed over the group's
    heads and the weighted queries (lse: the queries' log-sum-exps over every key)."""
    s = rule.logits(qg_BKGCD, k_BKSD, "bkgqd,bksd->bkgqs")
    ok = rule.slot_mask(visible_BKS, pos_BC)
    return jnp.sum(jnp.where(ok, jnp.exp(s - lse_BKGC1), 0.0) * w_B11C1, axis=(2, 3))


def _blocked_mass(cache: LayerCache, visible_pos_BKS, qg_BKGCD, lse_BKGC1, w_B11C1, pos_BC, rule):
    """`_mass` over the cache CACHE_BLOCK slots at a time (a block no query can see gets
    zeros without being computed; a last partial block in one pass), as `blocked_attention`
    goes: the chunk's probabilities never exist for more than one block."""
    b, kh = visible_pos_BKS.shape[:2]
    zero = jnp.zeros((b, kh, CACHE_BLOCK), jnp.float32)
    how = (qg_BKGCD, lse_BKGC1, w_B11C1, pos_BC, rule)

    def step(_, start):
        k, _v, pos = _block(cache, visible_pos_BKS, start, CACHE_BLOCK)
        mass = jax.lax.cond(_live(pos, pos_BC), lambda: _mass(k, pos, *how), lambda: zero)
        return None, mass

    whole = _whole(cache.capacity)
    per_block = jax.lax.scan(step, None, jnp.arange(0, whole, CACHE_BLOCK))[1]  # [N, B, K, 256]
    mass_BKS = jnp.moveaxis(per_block, 0, 2).reshape(b, kh, whole)
    if whole == cache.capacity:
        return mass_BKS
    k, _v, pos = _block(cache, visible_pos_BKS, whole, cache.capacity - whole)
    return jnp.concatenate([mass_BKS, _mass(k, pos, *how)], axis=-1)


def attention_mass(
    cache: LayerCache,
    visible_pos_BKS: jax.Array,
    q_BHCD: jax.Array,
    k_BKCD: jax.Array,
    pos_BC: jax.Array,
    lse_BHC: jax.Array,
    weight_BC: jax.Array,
    rule: AttentionRule,
) -> tuple[jax.Array, jax.Array]:
    """Attention probability paid to each cache slot and each new token, summed over the
    query heads of each KV group and over the chunk's queries weighted by weight_BC. A chunk
    of several queries over a cache of more than one block goes block by block, as `attend`.

    Returns (mass_BKS, mass_BKC) float32, for attention-scored policies (H2O, TOVA, SnapKV).
    """
    b, h, c, d = q_BHCD.shape
    kh = k_BKCD.shape[1]
    qg = q_BHCD.reshape(b, kh, h // kh, c, d)
    lse = jnp.where(jnp.isfinite(lse_BHC), lse_BHC, jnp.inf).reshape(b, kh, h // kh, c, 1)
    w = weight_BC.astype(jnp.float32)[:, None, None, :, None]
    if c > 1 and cache.capacity > CACHE_BLOCK:
        mass_c = _blocked_mass(cache, visible_pos_BKS, qg, lse, w, pos_BC, rule)
    else:
        mass_c = _mass(cache.k, visible_pos_BKS, qg, lse, w, pos_BC, rule)
    s_n = rule.logits(qg, k_BKCD, "bkgqd,bkcd->bkgqc")
    ok_n = rule.chunk_mask(pos_BC)[:, None, None]
    mass_n = jnp.sum(jnp.where(ok_n, jnp.exp(s_n - lse), 0.0) * w, axis=(2, 3))
    return mass_c, mass_n

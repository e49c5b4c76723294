"""Victim slot choice for the fixed-shape KV cache, in plain jax.numpy.

Only the small per-slot arrays are touched here: the caller writes the new k/v rows at the
returned destinations itself, for all layers of a group at once and in place
(`smartkv_jax.cache.write_rows`; docs/design.md: the cache).

Shapes (letters in names): B batch, K kv heads, S cache slots, C new tokens (1 for decode,
or a prefill chunk).

Semantics, independently for every (b, kv), for i = 0 .. C-1 in order:

    if new_pos[i] >= 0:
        j = argmin(rank)                       # lowest slot index on ties
        if new_rank[i] > rank[j]:              # strict
            pos[j], score[j], rank[j] = new_pos[i], new_score[i], new_rank[i]
            dest[i] = j                        # k[j], v[j] = new_k[i], new_v[i] (caller)

The caller gives empty slots rank -inf (they are filled first, lowest index first) and
protected slots rank +inf (never replaced). This greedy replacement keeps the top-S ranked
of the S + C candidates. Ranks must not be NaN.

`reference_evict_slots` runs the rule literally (C argmins; used for decode, C = 1);
`sorted_evict_slots` keeps the same set with one sort, or none while free slots suffice
(used for prefill chunks). The slot-ordering primitives it is built from (`places`: ranks to
places with one sort; `packed_indices`: a mask's indices without a sort; `scatter_last`) are
shared with the oneshot compression and the per-head budget rules.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

__all__ = [
    "packed_indices",
    "places",
    "reference_evict_slots",
    "scatter_last",
    "sorted_evict_slots",
]


def reference_evict_slots(
    pos_BKS: jax.Array,
    score_BKS: jax.Array,
    rank_BKS: jax.Array,
    new_pos_BKC: jax.Array,
    new_score_BKC: jax.Array,
    new_rank_BKC: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The greedy rule above, one new token at a time (C sequential argmins per row).

    Args:
      pos_BKS: int [B, K, S] token position per slot, -1 if empty.
      score_BKS: float [B, K, S] the policy's score per slot (carried, not compared).
      rank_BKS: float [B, K, S] eviction rank (lowest goes first; -inf empty, +inf
        protected).
      new_pos_BKC: int [B, K, C] new positions; negative marks a padding token (skipped).
      new_score_BKC, new_rank_BKC: float [B, K, C].

    Returns:
      (pos_BKS int32, score_BKS float32, rank_BKS float32, dest_BKC int32): the updated
      per-slot arrays and the slot each new token finally occupies, S when it was dropped
      or overwritten later in the same call (so the kept destinations are distinct).
    """
    S = pos_BKS.shape[-1]
    C = new_pos_BKC.shape[-1]
    new_pos_BKC = jnp.asarray(new_pos_BKC).astype(jnp.int32)
    new_score_BKC = jnp.asarray(new_score_BKC).astype(jnp.float32)
    new_rank_BKC = jnp.asarray(new_rank_BKC).astype(jnp.float32)
    slot_S = jnp.arange(S, dtype=jnp.int32)

    def insert_one(i, carry):
        pos, score, rank, src, dest = carry  # [B, K, S] x4 (src: new index per slot or -1)
        npos_BK = lax.dynamic_index_in_dim(new_pos_BKC, i, axis=2, keepdims=False)
        nscore_BK = lax.dynamic_index_in_dim(new_score_BKC, i, axis=2, keepdims=False)
        nrank_BK = lax.dynamic_index_in_dim(new_rank_BKC, i, axis=2, keepdims=False)
        j_BK = jnp.argmin(rank, axis=2).astype(jnp.int32)  # first index on ties
        rmin_BK = jnp.min(rank, axis=2)
        take_BK = (npos_BK >= 0) & (nrank_BK > rmin_BK)
        hit_BKS = take_BK[:, :, None] & (slot_S == j_BK[:, :, None])
        pos = jnp.where(hit_BKS, npos_BK[:, :, None], pos)
        score = jnp.where(hit_BKS, nscore_BK[:, :, None], score)
        rank = jnp.where(hit_BKS, nrank_BK[:, :, None], rank)
        src = jnp.where(hit_BKS, i, src)
        dest = lax.dynamic_update_index_in_dim(dest, jnp.where(take_BK, j_BK, S), i, axis=2)
        return pos, score, rank, src, dest

    carry = (
        jnp.asarray(pos_BKS).astype(jnp.int32),
        jnp.asarray(score_BKS).astype(jnp.float32),
        jnp.asarray(rank_BKS).astype(jnp.float32),
        jnp.full(pos_BKS.shape, -1, jnp.int32),
        jnp.full(new_pos_BKC.shape, S, jnp.int32),
    )
    pos_BKS, score_BKS, rank_BKS, src_BKS, dest_BKC = lax.fori_loop(0, C, insert_one, carry)
    # a slot taken twice in one call belongs to its last writer
    owner_BKC = jnp.take_along_axis(src_BKS, jnp.minimum(dest_BKC, S - 1), axis=2)
    dest_BKC = jnp.where(owner_BKC == jnp.arange(C, dtype=jnp.int32), dest_BKC, S)
    return pos_BKS, score_BKS, rank_BKS, dest_BKC


def scatter_last(dest_BKN: jax.Array, values_N: jax.Array, size: int) -> jax.Array:
    """[B, K, size] int32 holding values_N[n] at place dest_BKN[..., n] of each row (a place
    >= size is dropped; a place nothing lands on holds 0)."""
    b, k, n = dest_BKN.shape

    def row(dest_N):
        return jnp.zeros(size, jnp.int32).at[dest_N].set(values_N, mode="drop")

    return jax.vmap(row)(dest_BKN.reshape(b * k, n)).reshape(b, k, size)


def places(rank_BKN: jax.Array) -> jax.Array:
    """Each entry's place in its row, best first (0 = the best; ties: the lower index
    first), int32: one sort, then its inverse permutation by a scatter (a second argsort
    costs as much as the first on CPU)."""
    order_BKN = jnp.argsort(-rank_BKN, axis=-1, stable=True)
    n = rank_BKN.shape[-1]
    return scatter_last(order_BKN, jnp.arange(n, dtype=jnp.int32), n)


def packed_indices(mask_BKN: jax.Array, size: int) -> jax.Array:
    """[B, K, size] int32: the indices where each row of mask_BKN is True, ascending, then
    zeros (a cumulative sum and a scatter, no sort)."""
    n = mask_BKN.shape[-1]
    place = jnp.where(mask_BKN, jnp.cumsum(mask_BKN, axis=-1) - 1, size)
    return scatter_last(place, jnp.arange(n, dtype=jnp.int32), size)


def sorted_evict_slots(
    pos_BKS: jax.Array,
    score_BKS: jax.Array,
    rank_BKS: jax.Array,
    new_pos_BKC: jax.Array,
    new_score_BKC: jax.Array,
    new_rank_BKC: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """`reference_evict_slots` for a whole chunk at once: one stable sort of the S + C ranks
    instead of C sequential argmins (O((S + C) log(S + C)) rather than O(C * S) per row),
    and no sort at all while the free slots (rank -inf) take every new token.

    Keeps the same set as the greedy rule: the top S of the S + C candidates, with the
    greedy rule's tie order (old slots before new tokens, the lowest old slot evicted first,
    earlier new tokens before later ones) and padding tokens (pos < 0) never. Surviving new
    tokens fill the evicted slots in ascending slot order, so the slot a token lands in may
    differ from the greedy rule's; attention does not depend on slot order. Same returns as
    `reference_evict_slots`.
    """
    S = pos_BKS.shape[-1]
    pos_BKS = jnp.asarray(pos_BKS).astype(jnp.int32)
    new_pos_BKC = jnp.asarray(new_pos_BKC).astype(jnp.int32)
    new_rank_BKC = jnp.asarray(new_rank_BKC).astype(jnp.float32)
    new_rank_BKC = jnp.where(new_pos_BKC >= 0, new_rank_BKC, -jnp.inf)
    rank_BKS = jnp.asarray(rank_BKS).astype(jnp.float32)
    free_BKS, coming_BKC = rank_BKS == -jnp.inf, new_rank_BKC > -jnp.inf
    fits = jnp.all(jnp.sum(free_BKS, -1) >= jnp.sum(coming_BKC, -1))

    def by_rank():
        # old slots reversed: on equal rank the greedy rule evicts the lowest slot first
        keep = places(jnp.concatenate([rank_BKS[..., ::-1], new_rank_BKC], axis=-1)) < S
        return ~keep[..., :S][..., ::-1], keep[..., S:]

    # while every new token finds a free slot, the greedy rule fills the lowest free ones
    evicted_BKS, taken_BKC = jax.lax.cond(fits, lambda: (free_BKS, coming_BKC), by_rank)
    nth_BKC = jnp.maximum(jnp.cumsum(taken_BKC, axis=-1) - 1, 0)
    slots_BKS = packed_indices(evicted_BKS, S)  # evicted slots, ascending
    dest_BKC = jnp.where(taken_BKC, jnp.take_along_axis(slots_BKS, nth_BKC, axis=-1), S)
    B, K = dest_BKC.shape[:2]
    idx = (jnp.arange(B)[:, None, None], jnp.arange(K)[None, :, None], dest_BKC)

    def put(old, new):
        return old.at[idx].set(new.astype(old.dtype), mode="drop")

    return (
        put(pos_BKS, new_pos_BKC),
        put(jnp.asarray(score_BKS).astype(jnp.float32), new_score_BKC),
        put(rank_BKS, new_rank_BKC),
        dest_BKC.astype(jnp.int32),
    )

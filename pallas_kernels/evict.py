"""Choose victim cache slots and write new keys in place (TPU Pallas + jnp reference).

Shapes (letters in names): B batch, K kv heads, S cache slots, C new tokens (1 for decode,
or a prefill chunk), D head dim (keys and values may differ in D).

Semantics, independently for every (b, kv), for i = 0 .. C-1 in order:

    if new_pos[i] >= 0:
        j = argmin(rank)                       # lowest slot index on ties
        if new_rank[i] > rank[j]:              # strict
            k[j], v[j] = new_k[i], new_v[i]
            pos[j], score[j], rank[j] = new_pos[i], new_score[i], new_rank[i]

The caller gives empty slots rank -inf (they are filled first, lowest index first) and
protected slots rank +inf (never replaced). This greedy replacement keeps the top-S ranked
of the S + C candidates. Ranks must not be NaN.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

__all__ = ["evict_insert", "reference_evict_insert"]

CacheArrays = tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]


def _check_inputs(
    k_BKSD: jax.Array,
    v_BKSD: jax.Array,
    pos_BKS: jax.Array,
    score_BKS: jax.Array,
    rank_BKS: jax.Array,
    new_k_BKCD: jax.Array,
    new_v_BKCD: jax.Array,
    new_pos_BKC: jax.Array,
    new_score_BKC: jax.Array,
    new_rank_BKC: jax.Array,
) -> tuple[int, int, int, int]:
    """Validates shapes and dtypes; returns (B, K, S, C)."""
    for name, x in (
        ("k_BKSD", k_BKSD),
        ("v_BKSD", v_BKSD),
        ("new_k_BKCD", new_k_BKCD),
        ("new_v_BKCD", new_v_BKCD),
    ):
        if x.ndim != 4:
            raise ValueError(f"{name} must be 4-D, got shape {x.shape}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be a float array, got dtype {x.dtype}")
    B, K, S, _ = k_BKSD.shape
    if v_BKSD.shape[:3] != (B, K, S):
        raise ValueError(
            f"v_BKSD shape {v_BKSD.shape} does not match k_BKSD shape {k_BKSD.shape} in [B, K, S]"
        )
    for name, x in (("pos_BKS", pos_BKS), ("score_BKS", score_BKS), ("rank_BKS", rank_BKS)):
        if x.shape != (B, K, S):
            raise ValueError(
                f"{name} must have shape {(B, K, S)} to match k_BKSD {k_BKSD.shape}, got {x.shape}"
            )
    if pos_BKS.dtype != jnp.int32:
        raise ValueError(f"pos_BKS must be int32, got dtype {pos_BKS.dtype}")
    for name, x in (("score_BKS", score_BKS), ("rank_BKS", rank_BKS)):
        if x.dtype != jnp.float32:
            raise ValueError(f"{name} must be float32, got dtype {x.dtype}")
    C = new_k_BKCD.shape[2]
    if new_k_BKCD.shape != (B, K, C, k_BKSD.shape[3]):
        raise ValueError(
            f"new_k_BKCD must have shape {(B, K, C, k_BKSD.shape[3])} to match k_BKSD "
            f"{k_BKSD.shape}, got {new_k_BKCD.shape}"
        )
    if new_v_BKCD.shape != (B, K, C, v_BKSD.shape[3]):
        raise ValueError(
            f"new_v_BKCD must have shape {(B, K, C, v_BKSD.shape[3])} to match v_BKSD "
            f"{v_BKSD.shape} and new_k_BKCD {new_k_BKCD.shape}, got {new_v_BKCD.shape}"
        )
    for name, x in (
        ("new_pos_BKC", new_pos_BKC),
        ("new_score_BKC", new_score_BKC),
        ("new_rank_BKC", new_rank_BKC),
    ):
        if x.shape != (B, K, C):
            raise ValueError(
                f"{name} must have shape {(B, K, C)} to match new_k_BKCD {new_k_BKCD.shape}, "
                f"got {x.shape}"
            )
    if not jnp.issubdtype(new_pos_BKC.dtype, jnp.integer):
        raise ValueError(f"new_pos_BKC must be an integer array, got dtype {new_pos_BKC.dtype}")
    for name, x in (("new_score_BKC", new_score_BKC), ("new_rank_BKC", new_rank_BKC)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be a float array, got dtype {x.dtype}")
    if S == 0:
        raise ValueError(f"the cache needs at least one slot, got k_BKSD {k_BKSD.shape}")
    return B, K, S, C


def reference_evict_slots(
    pos_BKS: jax.Array,
    score_BKS: jax.Array,
    rank_BKS: jax.Array,
    new_pos_BKC: jax.Array,
    new_score_BKC: jax.Array,
    new_rank_BKC: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The victim choice of `reference_evict_insert` on the small per-slot arrays only.

    Returns the updated (pos_BKS, score_BKS, rank_BKS) and dest_BKC int32: the slot each
    new token finally occupies, or S when it was dropped or overwritten later in the same
    call. Writing new k/v rows at dest (`scatter_rows`) completes the insert, so a caller
    holding a stacked multi-layer cache can update it in place.
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


def sorted_evict_slots(
    pos_BKS: jax.Array,
    score_BKS: jax.Array,
    rank_BKS: jax.Array,
    new_pos_BKC: jax.Array,
    new_score_BKC: jax.Array,
    new_rank_BKC: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """`reference_evict_slots` for a whole chunk at once: one stable sort of the S + C ranks
    instead of C sequential argmins (O((S + C) log(S + C)) rather than O(C * S) per row).

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
    new_rank_BKC = jnp.where(new_pos_BKC >= 0, new_rank_BKC.astype(jnp.float32), -jnp.inf)
    rank_BKS = rank_BKS.astype(jnp.float32)
    # old slots reversed: on equal rank the greedy rule evicts the lowest slot index first
    rank_all = jnp.concatenate([rank_BKS[..., ::-1], new_rank_BKC], axis=-1)
    order = jnp.argsort(-rank_all, axis=-1, stable=True)  # best first; -inf last
    place = jnp.argsort(order, axis=-1, stable=True)  # position of each candidate in order
    keep = place < S
    evicted_BKS, taken_BKC = ~keep[..., :S][..., ::-1], keep[..., S:]
    free_BKS = jnp.argsort(~evicted_BKS, axis=-1, stable=True)  # evicted slots first, ascending
    nth_BKC = jnp.maximum(jnp.cumsum(taken_BKC, axis=-1) - 1, 0)
    dest_BKC = jnp.where(taken_BKC, jnp.take_along_axis(free_BKS, nth_BKC, axis=-1), S)
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


def scatter_rows(x_BKSD: jax.Array, dest_BKC: jax.Array, new_BKCD: jax.Array) -> jax.Array:
    """x with new rows written at slots dest (S = skip): C rows written, the rest untouched."""
    B, K = dest_BKC.shape[:2]
    b_BKC = jnp.arange(B)[:, None, None]
    h_BKC = jnp.arange(K)[None, :, None]
    x_BKSD = jnp.asarray(x_BKSD)
    return x_BKSD.at[b_BKC, h_BKC, dest_BKC].set(new_BKCD.astype(x_BKSD.dtype), mode="drop")


def reference_evict_insert(
    k_BKSD: jax.Array,
    v_BKSD: jax.Array,
    pos_BKS: jax.Array,
    score_BKS: jax.Array,
    rank_BKS: jax.Array,
    new_k_BKCD: jax.Array,
    new_v_BKCD: jax.Array,
    new_pos_BKC: jax.Array,
    new_score_BKC: jax.Array,
    new_rank_BKC: jax.Array,
) -> CacheArrays:
    """Greedy insert of C new tokens into a full-size cache, in plain jax.numpy.

    `reference_evict_slots` picks each new token's slot on the small per-slot arrays, then
    `scatter_rows` writes the surviving k/v rows (C rows written, the rest untouched).

    Args:
      k_BKSD, v_BKSD: cache keys / values [B, K, S, D], any float dtype.
      pos_BKS: int32 [B, K, S] token position per slot, -1 if empty.
      score_BKS: float32 [B, K, S] the policy's score per slot (carried, not compared).
      rank_BKS: float32 [B, K, S] eviction rank (lowest goes first; -inf empty, +inf
        protected).
      new_k_BKCD, new_v_BKCD: new keys / values [B, K, C, D], cast to the cache dtype.
      new_pos_BKC: int [B, K, C] new positions; negative marks an invalid token (skipped).
      new_score_BKC, new_rank_BKC: float [B, K, C], cast to float32.

    Returns:
      (k_BKSD, v_BKSD, pos_BKS, score_BKS, rank_BKS), same shapes and dtypes as the cache.
    """
    B, K, S, C = _check_inputs(
        k_BKSD,
        v_BKSD,
        pos_BKS,
        score_BKS,
        rank_BKS,
        new_k_BKCD,
        new_v_BKCD,
        new_pos_BKC,
        new_score_BKC,
        new_rank_BKC,
    )
    pos_BKS, score_BKS, rank_BKS, dest_BKC = reference_evict_slots(
        pos_BKS, score_BKS, rank_BKS, new_pos_BKC, new_score_BKC, new_rank_BKC
    )
    k_BKSD = scatter_rows(k_BKSD, dest_BKC, new_k_BKCD)
    v_BKSD = scatter_rows(v_BKSD, dest_BKC, new_v_BKCD)
    return k_BKSD, v_BKSD, pos_BKS, score_BKS, rank_BKS


def _evict_insert_kernel(
    # Inputs.
    new_pos_ref,  # VMEM [C, 1] int32
    new_score_ref,  # VMEM [C, 1] float32
    new_rank_ref,  # VMEM [C, 1] float32
    pos_in_ref,  # VMEM [1, S] int32 (aliased with pos_out_ref)
    score_in_ref,  # VMEM [1, S] float32 (aliased with score_out_ref)
    rank_in_ref,  # VMEM [1, S] float32 (aliased with rank_out_ref)
    new_k_hbm,  # HBM [B, K, C, Dk], already in the cache dtype
    new_v_hbm,  # HBM [B, K, C, Dv]
    k_in_hbm,  # HBM [B, K, S, Dk] (same buffer as k_hbm)
    v_in_hbm,  # HBM [B, K, S, Dv] (same buffer as v_hbm)
    # Outputs.
    pos_out_ref,  # VMEM [1, S] int32
    score_out_ref,  # VMEM [1, S] float32
    rank_out_ref,  # VMEM [1, S] float32
    k_hbm,  # HBM [B, K, S, Dk], written one row per surviving new token
    v_hbm,  # HBM [B, K, S, Dv]
    # Scratch.
    sem,  # DMA semaphore shared by all row copies of this grid step
) -> None:
    del k_in_hbm, v_in_hbm  # aliased: rows not written keep their values
    b, kv = pl.program_id(0), pl.program_id(1)
    C = new_pos_ref.shape[0]
    S = rank_in_ref.shape[1]
    slot_1S = lax.broadcasted_iota(jnp.int32, (1, S), 1)

    # Pass 1 (vector only): greedy replacement on pos/score/rank, remembering for each slot
    # which new token was written there last (-1: none).
    def insert_one(i, carry):
        pos_1S, score_1S, rank_1S, src_1S = carry
        npos_11 = new_pos_ref[pl.ds(i, 1), :]
        nscore_11 = new_score_ref[pl.ds(i, 1), :]
        nrank_11 = new_rank_ref[pl.ds(i, 1), :]
        rmin_11 = jnp.min(rank_1S, axis=1, keepdims=True)
        j_11 = jnp.min(jnp.where(rank_1S == rmin_11, slot_1S, S), axis=1, keepdims=True)
        take_11 = (npos_11 >= 0) & (nrank_11 > rmin_11)
        hit_1S = take_11 & (slot_1S == j_11)
        pos_1S = jnp.where(hit_1S, npos_11, pos_1S)
        score_1S = jnp.where(hit_1S, nscore_11, score_1S)
        rank_1S = jnp.where(hit_1S, nrank_11, rank_1S)
        src_1S = jnp.where(hit_1S, i, src_1S)
        return pos_1S, score_1S, rank_1S, src_1S

    pos_1S, score_1S, rank_1S, src_1S = lax.fori_loop(
        0,
        C,
        insert_one,
        (
            pos_in_ref[...],
            score_in_ref[...],
            rank_in_ref[...],
            jnp.full((1, S), -1, jnp.int32),
        ),
    )
    pos_out_ref[...] = pos_1S
    score_out_ref[...] = score_1S
    rank_out_ref[...] = rank_1S

    # Pass 2: one row DMA (HBM -> HBM) per new token that survived, to its final slot.
    # Destinations are distinct, so all copies run concurrently and are waited for after.
    def survivor(i):
        here_1S = src_1S == i
        found = jnp.max(here_1S.astype(jnp.int32), axis=1, keepdims=True)[0, 0]
        slot = jnp.max(jnp.where(here_1S, slot_1S, 0), axis=1, keepdims=True)[0, 0]
        copies = (
            pltpu.make_async_copy(
                new_k_hbm.at[b, kv, pl.ds(i, 1)], k_hbm.at[b, kv, pl.ds(slot, 1)], sem
            ),
            pltpu.make_async_copy(
                new_v_hbm.at[b, kv, pl.ds(i, 1)], v_hbm.at[b, kv, pl.ds(slot, 1)], sem
            ),
        )
        return found != 0, copies

    def start(i, carry):
        found, copies = survivor(i)

        @pl.when(found)
        def _():
            for copy in copies:
                copy.start()

        return carry

    def wait(i, carry):
        found, copies = survivor(i)

        @pl.when(found)
        def _():
            for copy in copies:
                copy.wait()

        return carry

    lax.fori_loop(0, C, start, 0)
    lax.fori_loop(0, C, wait, 0)


def evict_insert(
    k_BKSD: jax.Array,
    v_BKSD: jax.Array,
    pos_BKS: jax.Array,
    score_BKS: jax.Array,
    rank_BKS: jax.Array,
    new_k_BKCD: jax.Array,
    new_v_BKCD: jax.Array,
    new_pos_BKC: jax.Array,
    new_score_BKC: jax.Array,
    new_rank_BKC: jax.Array,
    *,
    interpret: Any = False,
) -> CacheArrays:
    """Greedy insert of C new tokens into the cache, as a TPU Pallas kernel writing in place.

    Grid (B, K). Each step loads the [S] pos/score/rank rows of its (b, kv) into VMEM, runs
    the greedy replacement over the C new tokens with vector ops, writes the rows back, and
    copies each surviving new key/value row straight into its slot of k/v in HBM by DMA.
    k, v, pos, score and rank are aliased to the outputs (donate them under jit to avoid a
    copy); the untouched k/v rows are never read or written.

    Args:
      k_BKSD, v_BKSD: cache keys / values [B, K, S, D], any float dtype.
      pos_BKS: int32 [B, K, S] token position per slot, -1 if empty.
      score_BKS: float32 [B, K, S] the policy's score per slot (carried, not compared).
      rank_BKS: float32 [B, K, S] eviction rank (lowest goes first; -inf empty, +inf
        protected).
      new_k_BKCD, new_v_BKCD: new keys / values [B, K, C, D], cast to the cache dtype.
      new_pos_BKC: int [B, K, C] new positions; negative marks an invalid token (skipped).
      new_score_BKC, new_rank_BKC: float [B, K, C], cast to float32.
      interpret: passed to ``pl.pallas_call`` (False, True or ``pltpu.InterpretParams``).

    Returns:
      (k_BKSD, v_BKSD, pos_BKS, score_BKS, rank_BKS), same shapes and dtypes as the cache.
    """
    B, K, S, C = _check_inputs(
        k_BKSD,
        v_BKSD,
        pos_BKS,
        score_BKS,
        rank_BKS,
        new_k_BKCD,
        new_v_BKCD,
        new_pos_BKC,
        new_score_BKC,
        new_rank_BKC,
    )
    if C == 0:
        return k_BKSD, v_BKSD, pos_BKS, score_BKS, rank_BKS
    new_k_BKCD = new_k_BKCD.astype(k_BKSD.dtype)
    new_v_BKCD = new_v_BKCD.astype(v_BKSD.dtype)
    new_pos_BKC1 = new_pos_BKC.astype(jnp.int32)[..., None]
    new_score_BKC1 = new_score_BKC.astype(jnp.float32)[..., None]
    new_rank_BKC1 = new_rank_BKC.astype(jnp.float32)[..., None]
    pos_BK1S = pos_BKS.reshape(B, K, 1, S)
    score_BK1S = score_BKS.reshape(B, K, 1, S)
    rank_BK1S = rank_BKS.reshape(B, K, 1, S)

    sq = pl.Squeezed()
    new_spec = pl.BlockSpec((sq, sq, C, 1), lambda b, kv: (b, kv, 0, 0))
    slot_spec = pl.BlockSpec((sq, sq, 1, S), lambda b, kv: (b, kv, 0, 0))
    hbm_spec = pl.BlockSpec(memory_space=pl.ANY)
    pos_out, score_out, rank_out, k_out, v_out = pl.pallas_call(
        _evict_insert_kernel,
        out_shape=[
            jax.ShapeDtypeStruct(pos_BK1S.shape, pos_BK1S.dtype),
            jax.ShapeDtypeStruct(score_BK1S.shape, score_BK1S.dtype),
            jax.ShapeDtypeStruct(rank_BK1S.shape, rank_BK1S.dtype),
            jax.ShapeDtypeStruct(k_BKSD.shape, k_BKSD.dtype),
            jax.ShapeDtypeStruct(v_BKSD.shape, v_BKSD.dtype),
        ],
        grid=(B, K),
        in_specs=[new_spec, new_spec, new_spec, slot_spec, slot_spec, slot_spec] + [hbm_spec] * 4,
        out_specs=[slot_spec, slot_spec, slot_spec, hbm_spec, hbm_spec],
        scratch_shapes=[pltpu.SemaphoreType.DMA(())],
        input_output_aliases={3: 0, 4: 1, 5: 2, 8: 3, 9: 4},
        compiler_params=pltpu.CompilerParams(dimension_semantics=(pltpu.PARALLEL, pltpu.PARALLEL)),
        interpret=interpret,
        name="smartkv_evict_insert",
    )(
        new_pos_BKC1,
        new_score_BKC1,
        new_rank_BKC1,
        pos_BK1S,
        score_BK1S,
        rank_BK1S,
        new_k_BKCD,
        new_v_BKCD,
        k_BKSD,
        v_BKSD,
    )
    return (
        k_out,
        v_out,
        pos_out.reshape(B, K, S),
        score_out.reshape(B, K, S),
        rank_out.reshape(B, K, S),
    )

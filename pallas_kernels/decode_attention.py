"""Attention of T new queries over a fixed-shape, masked KV cache (TPU Pallas + jnp reference).

Shapes (letters in names): B batch, H query heads, K kv heads (H % K == 0, GQA group
G = H // K; query head h reads kv head h // G), T new queries (1 for decode, or a prefill
chunk), S cache slots, D head dim, R = G * T query rows per kv head.

A slot (b, kv, s) is valid for query (b, h, t) iff ``slot_pos[b, kv, s] >= 0`` and
``slot_pos[b, kv, s] <= q_pos[b, t]`` (and, with a ``window`` W, ``slot_pos > q_pos - W``: a
sliding-window layer). A query with ``q_pos < 0`` is padding and sees no slot.
Both functions return the softmax-weighted sum of v over valid slots (``out_BHTD``) and the
log-sum-exp of the scaled logits over valid slots (``lse_BHT``, natural log), so the caller
can merge this result with attention over the new chunk's own keys. A query with no valid
slot gets ``out = 0`` and ``lse = -inf``. All arithmetic is float32 whatever the input dtype.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

__all__ = ["decode_attention", "reference_decode_attention"]

_HIGHEST = lax.Precision.HIGHEST


def _check_inputs(
    q_BHTD: jax.Array,
    k_BKSD: jax.Array,
    v_BKSD: jax.Array,
    slot_pos_BKS: jax.Array,
    q_pos_BT: jax.Array,
) -> tuple[int, int, int, int, int, int]:
    """Validates shapes and dtypes; returns (B, H, K, T, S, D)."""
    for name, x in (("q_BHTD", q_BHTD), ("k_BKSD", k_BKSD), ("v_BKSD", v_BKSD)):
        if x.ndim != 4:
            raise ValueError(f"{name} must be 4-D, got shape {x.shape}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be a float array, got dtype {x.dtype}")
    B, H, T, D = q_BHTD.shape
    if k_BKSD.shape != v_BKSD.shape:
        raise ValueError(
            f"k_BKSD and v_BKSD must have the same shape, got {k_BKSD.shape} and {v_BKSD.shape}"
        )
    Bk, K, S, Dk = k_BKSD.shape
    if Bk != B or Dk != D:
        raise ValueError(
            f"k_BKSD shape {k_BKSD.shape} does not match q_BHTD shape {q_BHTD.shape} "
            "in batch or head dim"
        )
    if K == 0 or H % K != 0:
        raise ValueError(
            f"query heads H={H} (q_BHTD {q_BHTD.shape}) must be a multiple of kv heads "
            f"K={K} (k_BKSD {k_BKSD.shape})"
        )
    if slot_pos_BKS.shape != (B, K, S):
        raise ValueError(
            f"slot_pos_BKS must have shape {(B, K, S)} to match k_BKSD {k_BKSD.shape}, "
            f"got {slot_pos_BKS.shape}"
        )
    if q_pos_BT.shape != (B, T):
        raise ValueError(
            f"q_pos_BT must have shape {(B, T)} to match q_BHTD {q_BHTD.shape}, "
            f"got {q_pos_BT.shape}"
        )
    for name, x in (("slot_pos_BKS", slot_pos_BKS), ("q_pos_BT", q_pos_BT)):
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"{name} must be an integer array, got dtype {x.dtype}")
    return B, H, K, T, S, D


def _logits(q_BKGTD: jax.Array, k_BKSD: jax.Array) -> jax.Array:
    """q . k over D, [B, K, G, T, S] float32. With one query per row (decode) the product is
    laid out slots-major ([B, K, S, G]: slots as the matmul's rows) and transposed after: on
    XLA's CPU backend that runs about 3x faster than G x D rows times S columns, while for a
    prefill chunk (T > 1) the query-major product is the faster one."""
    if q_BKGTD.shape[3] != 1:
        return jnp.einsum("bkgtd,bksd->bkgts", q_BKGTD, k_BKSD, precision=_HIGHEST)
    s_BKSG = jnp.einsum("bksd,bkgd->bksg", k_BKSD, q_BKGTD[:, :, :, 0], precision=_HIGHEST)
    return jnp.swapaxes(s_BKSG, 2, 3)[:, :, :, None, :]


def _valid(slot_pos: jax.Array, q_pos: jax.Array, window: int) -> jax.Array:
    """Which (query, slot) pairs attend: broadcastable int32 positions -> bool."""
    ok = (slot_pos >= 0) & (slot_pos <= q_pos)
    return ok & (slot_pos > q_pos - window) if window else ok


def reference_decode_attention(
    q_BHTD: jax.Array,
    k_BKSD: jax.Array,
    v_BKSD: jax.Array,
    slot_pos_BKS: jax.Array,
    q_pos_BT: jax.Array,
    *,
    scale: float | None = None,
    window: int = 0,
) -> tuple[jax.Array, jax.Array]:
    """Masked GQA attention of new queries over a cache, in plain jax.numpy.

    Args:
      q_BHTD: queries [B, H, T, D], float32 or bfloat16 (post-RoPE).
      k_BKSD: cached keys [B, K, S, D] (post-RoPE), float.
      v_BKSD: cached values [B, K, S, D], float.
      slot_pos_BKS: token position held by each slot [B, K, S], int; -1 for an empty slot.
      q_pos_BT: token position of each query [B, T], int; negative for a padding query.
      scale: logit scale; defaults to D ** -0.5.
      window: attention window W of a sliding-window layer (0: none).

    Returns:
      out_BHTD: float32 [B, H, T, D]; 0 for a query without valid slots.
      lse_BHT: float32 [B, H, T], log-sum-exp of the scaled logits over valid slots
        (natural log); -inf for a query without valid slots.
    """
    B, H, K, T, _, D = _check_inputs(q_BHTD, k_BKSD, v_BKSD, slot_pos_BKS, q_pos_BT)
    G = H // K
    scale = D**-0.5 if scale is None else scale
    q_BKGTD = q_BHTD.astype(jnp.float32).reshape(B, K, G, T, D)
    k_BKSD = k_BKSD.astype(jnp.float32)
    v_BKSD = v_BKSD.astype(jnp.float32)
    s_BKGTS = _logits(q_BKGTD, k_BKSD) * scale
    slot_pos_BK11S = slot_pos_BKS.astype(jnp.int32)[:, :, None, None, :]
    q_pos_B11T1 = q_pos_BT.astype(jnp.int32)[:, None, None, :, None]
    valid_BK1TS = _valid(slot_pos_BK11S, q_pos_B11T1, window)
    s_BKGTS = jnp.where(valid_BK1TS, s_BKGTS, -jnp.inf)
    m_BKGT1 = jnp.max(s_BKGTS, axis=-1, keepdims=True)
    m_safe_BKGT1 = jnp.where(m_BKGT1 == -jnp.inf, 0.0, m_BKGT1)
    p_BKGTS = jnp.exp(s_BKGTS - m_safe_BKGT1)
    l_BKGT1 = jnp.sum(p_BKGTS, axis=-1, keepdims=True)
    acc_BKGTD = jnp.einsum("bkgts,bksd->bkgtd", p_BKGTS, v_BKSD, precision=_HIGHEST)
    has_BKGT1 = l_BKGT1 > 0
    out_BKGTD = jnp.where(has_BKGT1, acc_BKGTD / jnp.where(has_BKGT1, l_BKGT1, 1.0), 0.0)
    lse_BKGT1 = jnp.where(
        has_BKGT1, m_safe_BKGT1 + jnp.log(jnp.where(has_BKGT1, l_BKGT1, 1.0)), -jnp.inf
    )
    return out_BKGTD.reshape(B, H, T, D), lse_BKGT1.reshape(B, H, T)


def _decode_attention_kernel(
    # Scalar prefetch (SMEM), flattened [B * K * N] int32.
    live_ref,  # 1 if slot block n of (b, kv) holds any slot valid for some query, else 0.
    src_ref,  # slot block actually fetched at step n (repeats the last live block when dead).
    # Inputs (VMEM blocks).
    q_ref,  # [R, D] queries of the kv head's group, row r = g * T + t.
    k_ref,  # [bs, D]
    v_ref,  # [bs, D]
    slot_pos_ref,  # [1, bs] int32
    q_pos_ref,  # [R, 1] int32
    # Outputs (VMEM blocks, written at the last slot block).
    out_ref,  # [R, D] float32
    lse_ref,  # [R, 1] float32
    # Scratch (VMEM), carried over the slot-block axis.
    m_sc,  # [R, 1] float32 running max of the logits
    l_sc,  # [R, 1] float32 running sum of exp(logit - m)
    acc_sc,  # [R, D] float32 running sum of exp(logit - m) * v
    *,
    scale: float,
    window: int,
    num_kv: int,
    num_blocks: int,
) -> None:
    del src_ref  # only used by the index maps
    b, kv, n = pl.program_id(0), pl.program_id(1), pl.program_id(2)

    @pl.when(n == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(live_ref[(b * num_kv + kv) * num_blocks + n] != 0)
    def _accumulate():
        q_RD = q_ref[...].astype(jnp.float32)
        k_bD = k_ref[...].astype(jnp.float32)
        v_bD = v_ref[...].astype(jnp.float32)
        s_Rb = lax.dot_general(
            q_RD,
            k_bD,
            (((1,), (1,)), ((), ())),
            precision=_HIGHEST,
            preferred_element_type=jnp.float32,
        )
        s_Rb = s_Rb * scale
        valid_Rb = _valid(slot_pos_ref[...], q_pos_ref[...], window)
        s_Rb = jnp.where(valid_Rb, s_Rb, -jnp.inf)
        m_prev_R1 = m_sc[...]
        m_new_R1 = jnp.maximum(m_prev_R1, jnp.max(s_Rb, axis=1, keepdims=True))
        m_safe_R1 = jnp.where(m_new_R1 == -jnp.inf, 0.0, m_new_R1)
        alpha_R1 = jnp.exp(m_prev_R1 - m_safe_R1)
        p_Rb = jnp.exp(s_Rb - m_safe_R1)
        l_sc[...] = alpha_R1 * l_sc[...] + jnp.sum(p_Rb, axis=1, keepdims=True)
        pv_RD = lax.dot_general(
            p_Rb,
            v_bD,
            (((1,), (0,)), ((), ())),
            precision=_HIGHEST,
            preferred_element_type=jnp.float32,
        )
        acc_sc[...] = alpha_R1 * acc_sc[...] + pv_RD
        m_sc[...] = m_new_R1

    @pl.when(n == num_blocks - 1)
    def _finalize():
        l_R1 = l_sc[...]
        has_R1 = l_R1 > 0
        l_safe_R1 = jnp.where(has_R1, l_R1, 1.0)
        out_ref[...] = jnp.where(has_R1, acc_sc[...] / l_safe_R1, 0.0)
        m_R1 = m_sc[...]
        lse_ref[...] = jnp.where(has_R1, m_R1 + jnp.log(l_safe_R1), -jnp.inf)


def _pad_slots(
    k_BKSD: jax.Array, v_BKSD: jax.Array, slot_pos_BKS: jax.Array, S_pad: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Pads the slot axis to ``S_pad`` with empty slots (zero k and v, pos -1); slot_pos
    comes back as int32."""
    slot_pos_BKS = slot_pos_BKS.astype(jnp.int32)
    S = k_BKSD.shape[2]
    if S_pad != S:
        pad = ((0, 0), (0, 0), (0, S_pad - S))
        k_BKSD = jnp.pad(k_BKSD, (*pad, (0, 0)))
        v_BKSD = jnp.pad(v_BKSD, (*pad, (0, 0)))
        slot_pos_BKS = jnp.pad(slot_pos_BKS, pad, constant_values=-1)
    return k_BKSD, v_BKSD, slot_pos_BKS


def _group_queries(q_BHTD: jax.Array, q_pos_BT: jax.Array, K: int) -> tuple[jax.Array, jax.Array]:
    """Queries as R = G * T rows per kv head, [B, K, R, D], and each row's position
    [B, R, 1] int32 (row g * T + t -> q_pos[b, t])."""
    B, H, T, D = q_BHTD.shape
    G = H // K
    # Query head h = kv * G + g, so this reshape groups each kv head's queries as rows.
    q_BKRD = q_BHTD.reshape(B, K, G * T, D)
    q_pos_BR1 = jnp.tile(q_pos_BT, (1, G)).reshape(B, G * T, 1)
    return q_BKRD, q_pos_BR1


def _live_blocks(
    slot_pos_BKS: jax.Array, q_pos_BT: jax.Array, *, N: int, bs: int, window: int
) -> tuple[jax.Array, jax.Array]:
    """Which slot blocks can contribute at all, and which block to fetch at each step.

    Returns (live_flat, src_flat), both int32 [B * K * N]: 1 if block n of (b, kv) holds a
    slot valid for some query of batch row b, and the block fetched at step n (the last live
    block up to n, or the first live block while none has been seen), so a dead step
    re-points at an already fetched block and its DMA is elided.
    """
    B, K, _ = slot_pos_BKS.shape
    q_max_B = jnp.max(q_pos_BT, axis=1)
    valid_BKS = (slot_pos_BKS >= 0) & (slot_pos_BKS <= q_max_B[:, None, None])
    if window:  # no query of the row reaches back past its earliest real query's window
        q_min_B = jnp.min(jnp.where(q_pos_BT >= 0, q_pos_BT, q_max_B[:, None]), axis=1)
        valid_BKS &= slot_pos_BKS > q_min_B[:, None, None] - window
    live_BKN = jnp.any(valid_BKS.reshape(B, K, N, bs), axis=-1)
    n_BKN = jnp.broadcast_to(jnp.arange(N, dtype=jnp.int32), (B, K, N))
    last_live_BKN = lax.cummax(jnp.where(live_BKN, n_BKN, -1), axis=2)
    first_live_BK1 = jnp.argmax(live_BKN, axis=2).astype(jnp.int32)[:, :, None]
    src_BKN = jnp.where(last_live_BKN < 0, first_live_BK1, last_live_BKN)
    live_flat = live_BKN.astype(jnp.int32).reshape(-1)
    src_flat = src_BKN.astype(jnp.int32).reshape(-1)
    return live_flat, src_flat


def _decode_attention_call(
    *,
    B: int,
    K: int,
    N: int,
    R: int,
    D: int,
    bs: int,
    scale: float,
    window: int,
    interpret: Any,
):
    """The ``pl.pallas_call`` of the kernel over grid (B, K, N), taking (live_flat, src_flat,
    q_BKRD, k_BKSD, v_BKSD, slot_pos_BK1S, q_pos_BR1) and returning (out_BKRD, lse_BKR1)."""

    def slot_block(b, kv, n, live_ref, src_ref):
        del live_ref
        return src_ref[(b * K + kv) * N + n]

    sq = pl.Squeezed()
    in_specs = [
        pl.BlockSpec((sq, sq, R, D), lambda b, kv, n, lv, sr: (b, kv, 0, 0)),
        pl.BlockSpec(
            (sq, sq, bs, D), lambda b, kv, n, lv, sr: (b, kv, slot_block(b, kv, n, lv, sr), 0)
        ),
        pl.BlockSpec(
            (sq, sq, bs, D), lambda b, kv, n, lv, sr: (b, kv, slot_block(b, kv, n, lv, sr), 0)
        ),
        pl.BlockSpec(
            (sq, sq, 1, bs), lambda b, kv, n, lv, sr: (b, kv, 0, slot_block(b, kv, n, lv, sr))
        ),
        pl.BlockSpec((sq, R, 1), lambda b, kv, n, lv, sr: (b, 0, 0)),
    ]
    out_specs = [
        pl.BlockSpec((sq, sq, R, D), lambda b, kv, n, lv, sr: (b, kv, 0, 0)),
        pl.BlockSpec((sq, sq, R, 1), lambda b, kv, n, lv, sr: (b, kv, 0, 0)),
    ]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(B, K, N),
        in_specs=in_specs,
        out_specs=out_specs,
        scratch_shapes=[
            pltpu.VMEM((R, 1), jnp.float32),
            pltpu.VMEM((R, 1), jnp.float32),
            pltpu.VMEM((R, D), jnp.float32),
        ],
    )
    kernel = functools.partial(
        _decode_attention_kernel,
        scale=scale,
        window=window,
        num_kv=K,
        num_blocks=N,
    )
    return pl.pallas_call(
        kernel,
        out_shape=[
            jax.ShapeDtypeStruct((B, K, R, D), jnp.float32),
            jax.ShapeDtypeStruct((B, K, R, 1), jnp.float32),
        ],
        grid_spec=grid_spec,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=(pltpu.PARALLEL, pltpu.PARALLEL, pltpu.ARBITRARY)
        ),
        interpret=interpret,
        name="smartkv_decode_attention",
    )


def decode_attention(
    q_BHTD: jax.Array,
    k_BKSD: jax.Array,
    v_BKSD: jax.Array,
    slot_pos_BKS: jax.Array,
    q_pos_BT: jax.Array,
    *,
    scale: float | None = None,
    window: int = 0,
    block_s: int = 128,
    interpret: Any = False,
) -> tuple[jax.Array, jax.Array]:
    """Masked GQA attention of new queries over a cache, as a TPU Pallas kernel.

    Grid (B, K, N) over batch, kv heads and blocks of ``block_s`` slots; the G query heads
    of a kv head are processed together as R = G * T rows. Online softmax over the slot
    blocks; a block holding no slot valid for any query of the batch row is skipped (no
    compute, and its DMA is elided by re-pointing the index map at the last live block).
    S need not be a multiple of ``block_s``: the wrapper pads with empty slots (pos -1).

    Args:
      q_BHTD: queries [B, H, T, D], float32 or bfloat16 (post-RoPE).
      k_BKSD: cached keys [B, K, S, D] (post-RoPE), float.
      v_BKSD: cached values [B, K, S, D], float.
      slot_pos_BKS: token position held by each slot [B, K, S], int; -1 for an empty slot.
      q_pos_BT: token position of each query [B, T], int; negative for a padding query.
      scale: logit scale; defaults to D ** -0.5.
      window: attention window W of a sliding-window layer (0: none).
      block_s: slots per grid step. On TPU use a multiple of 128 (or any value >= S, which
        makes a single block of S slots).
      interpret: passed to ``pl.pallas_call`` (False, True or ``pltpu.InterpretParams``).

    Returns:
      out_BHTD: float32 [B, H, T, D]; 0 for a query without valid slots.
      lse_BHT: float32 [B, H, T], natural-log log-sum-exp of the scaled logits over valid
        slots; -inf for a query without valid slots.
    """
    B, H, K, T, S, D = _check_inputs(q_BHTD, k_BKSD, v_BKSD, slot_pos_BKS, q_pos_BT)
    if not isinstance(block_s, int) or block_s <= 0:
        raise ValueError(f"block_s must be a positive int, got {block_s!r}")
    if S == 0 or T == 0:
        raise ValueError(
            f"need at least one slot and one query, got k_BKSD {k_BKSD.shape}, "
            f"q_BHTD {q_BHTD.shape}"
        )
    G = H // K
    R = G * T
    scale = float(D**-0.5 if scale is None else scale)

    bs = min(S, block_s)
    if not interpret and bs < S and bs % 128:
        raise ValueError(
            f"block_s={block_s} must be a multiple of 128 on TPU (or >= S={S}, "
            f"k_BKSD {k_BKSD.shape}); other sizes are only for interpret mode"
        )
    N = pl.cdiv(S, bs)
    q_pos_BT = q_pos_BT.astype(jnp.int32)
    k_BKSD, v_BKSD, slot_pos_BKS = _pad_slots(k_BKSD, v_BKSD, slot_pos_BKS, N * bs)
    q_BKRD, q_pos_BR1 = _group_queries(q_BHTD, q_pos_BT, K)
    slot_pos_BK1S = slot_pos_BKS.reshape(B, K, 1, N * bs)
    live_flat, src_flat = _live_blocks(slot_pos_BKS, q_pos_BT, N=N, bs=bs, window=window)
    call = _decode_attention_call(
        B=B,
        K=K,
        N=N,
        R=R,
        D=D,
        bs=bs,
        scale=scale,
        window=window,
        interpret=interpret,
    )
    out_BKRD, lse_BKR1 = call(live_flat, src_flat, q_BKRD, k_BKSD, v_BKSD, slot_pos_BK1S, q_pos_BR1)
    return out_BKRD.reshape(B, H, T, D), lse_BKR1.reshape(B, H, T)

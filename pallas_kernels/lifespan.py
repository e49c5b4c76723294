"""Blockwise lifespan labels without a T x T matrix (TPU Pallas + jnp references).

Shapes (letters in names): B batch, H query heads, K kv heads (H % K == 0, GQA group
G = H // K; query head h reads kv head h // G), T tokens in the window, D head dim.

Definition (docs/design.md): with causal softmax attention A_g[i, j] (i >= j) of query head g,
the lifespan of the key at position j of kv head h is

    L(j) = max{ i - j : i >= j, max over the G query heads g of h of A_g[i, j] > tau }

and L(j) = 0 when no query passes tau. q and k are post-RoPE; L is in tokens, int32, not
clipped (the caller clips at its cap).

Two passes, both blockwise: pass 1 computes each query row's log-sum-exp with an online
softmax over key blocks; pass 2 scans, for each key block, the query blocks at or below the
diagonal, forms p = exp(s - lse) and keeps per key the largest row i with p > tau.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

__all__ = ["dense_lifespan", "lifespan", "reference_lifespan"]

_HIGHEST = lax.Precision.HIGHEST


def _check_inputs(q_BHTD: jax.Array, k_BKTD: jax.Array) -> tuple[int, int, int, int, int]:
    """Validates shapes and dtypes; returns (B, H, K, T, D)."""
    for name, x in (("q_BHTD", q_BHTD), ("k_BKTD", k_BKTD)):
        if x.ndim != 4:
            raise ValueError(f"{name} must be 4-D, got shape {x.shape}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be a float array, got dtype {x.dtype}")
    B, H, T, D = q_BHTD.shape
    Bk, K, Tk, Dk = k_BKTD.shape
    if (Bk, Tk, Dk) != (B, T, D):
        raise ValueError(
            f"k_BKTD shape {k_BKTD.shape} does not match q_BHTD shape {q_BHTD.shape} "
            "in batch, tokens or head dim"
        )
    if K == 0 or H % K != 0:
        raise ValueError(
            f"query heads H={H} (q_BHTD {q_BHTD.shape}) must be a multiple of kv heads "
            f"K={K} (k_BKTD {k_BKTD.shape})"
        )
    if T == 0:
        raise ValueError(f"need at least one token, got q_BHTD {q_BHTD.shape}")
    return B, H, K, T, D


def _check_block(name: str, value: int) -> None:
    if not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _dot_t(a_MD: jax.Array, b_ND: jax.Array) -> jax.Array:
    """[M, D] x [N, D] -> [M, N] in float32."""
    return lax.dot_general(
        a_MD,
        b_ND,
        (((a_MD.ndim - 1,), (b_ND.ndim - 1,)), ((), ())),
        precision=_HIGHEST,
        preferred_element_type=jnp.float32,
    )


def dense_lifespan(
    q_BHTD: jax.Array,
    k_BKTD: jax.Array,
    *,
    tau: float = 0.05,
    scale: float | None = None,
    window: int = 0,
) -> jax.Array:
    """Lifespans from the full causal softmax [B, H, T, T] (tests and memory benchmark only).

    Args:
      q_BHTD: post-RoPE queries [B, H, T, D], float.
      k_BKTD: post-RoPE keys [B, K, T, D], float.
      tau: attention-probability threshold (strict: A > tau counts).
      scale: logit scale; defaults to D ** -0.5.
      window: attention window W of a sliding-window layer (query i sees keys j > i - W;
        0: none).

    Returns:
      L_BKT: int32 [B, K, T], lifespan of each key in tokens (0 when no query passes tau).
    """
    B, H, K, T, D = _check_inputs(q_BHTD, k_BKTD)
    G = H // K
    scale = D**-0.5 if scale is None else scale
    q_BKGTD = q_BHTD.astype(jnp.float32).reshape(B, K, G, T, D)
    k_BKTD = k_BKTD.astype(jnp.float32)
    s_BKGTT = jnp.einsum("bkgid,bkjd->bkgij", q_BKGTD, k_BKTD, precision=_HIGHEST) * scale
    i_T1 = jnp.arange(T, dtype=jnp.int32)[:, None]
    j_1T = jnp.arange(T, dtype=jnp.int32)[None, :]
    causal_TT = _seen(i_T1, j_1T, window)
    s_BKGTT = jnp.where(causal_TT, s_BKGTT, -jnp.inf)
    lse_BKGT1 = jax.nn.logsumexp(s_BKGTT, axis=-1, keepdims=True)
    p_BKGTT = jnp.exp(s_BKGTT - lse_BKGT1)
    hit_BKTT = jnp.any(p_BKGTT > tau, axis=2) & causal_TT
    last_BKT = jnp.max(jnp.where(hit_BKTT, i_T1, -1), axis=2)
    return jnp.maximum(last_BKT - j_1T[0], 0).astype(jnp.int32)


def _seen(i: jax.Array, j: jax.Array, window: int) -> jax.Array:
    """Whether query position i attends to key position j (causal, windowed if W > 0)."""
    return (i >= j) & (j > i - window) if window else i >= j


def _blocked(x_BKTD: jax.Array, n: int, blk: int) -> jax.Array:
    """Pads the T axis (axis 2) to n * blk with zeros."""
    T = x_BKTD.shape[2]
    return jnp.pad(x_BKTD, ((0, 0), (0, 0), (0, n * blk - T), (0, 0)))


def reference_lifespan(
    q_BHTD: jax.Array,
    k_BKTD: jax.Array,
    *,
    tau: float = 0.05,
    scale: float | None = None,
    block: int = 128,
    window: int = 0,
) -> jax.Array:
    """Lifespans computed blockwise in plain jax.numpy (no T x T matrix per head).

    Peak extra memory is O(B * H * T * block): ``lax.map`` runs over blocks of ``block``
    rows (pass 1) or keys (pass 2) and a ``lax.fori_loop`` over the causal partner blocks.

    Args:
      q_BHTD: post-RoPE queries [B, H, T, D], float.
      k_BKTD: post-RoPE keys [B, K, T, D], float.
      tau: attention-probability threshold (strict: A > tau counts).
      scale: logit scale; defaults to D ** -0.5.
      block: tokens per block for both queries and keys.
      window: as in `dense_lifespan`.

    Returns:
      L_BKT: int32 [B, K, T], lifespan of each key in tokens (0 when no query passes tau).
    """
    B, H, K, T, D = _check_inputs(q_BHTD, k_BKTD)
    _check_block("block", block)
    G = H // K
    scale = D**-0.5 if scale is None else scale
    bt = min(block, T)
    N = pl.cdiv(T, bt)
    Tp = N * bt
    q_BKGND = _blocked(q_BHTD.astype(jnp.float32), N, bt).reshape(B, K, G, N, bt, D)
    k_BKND = _blocked(k_BKTD.astype(jnp.float32), N, bt).reshape(B, K, N, bt, D)
    off_b = jnp.arange(bt, dtype=jnp.int32)

    def scores(qn, kn):
        """Masked scaled logits [B, K, G, bt(rows), bt(keys)] of query block qn, key block kn."""
        q_BKGbD = q_BKGND[:, :, :, qn]
        k_BKbD = k_BKND[:, :, kn]
        s = jnp.einsum("bkgid,bkjd->bkgij", q_BKGbD, k_BKbD, precision=_HIGHEST) * scale
        i_b1 = (qn * bt + off_b)[:, None]
        j_1b = (kn * bt + off_b)[None, :]
        mask_bb = _seen(i_b1, j_1b, window) & (j_1b < T)
        return jnp.where(mask_bb, s, -jnp.inf), i_b1, j_1b

    # Pass 1: log-sum-exp of each query row over its causal keys (online softmax).
    def row_lse(qn):
        def step(kn, carry):
            m, l_sum = carry  # [B, K, G, bt] each
            s, _, _ = scores(qn, kn)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            # a block wholly outside a row's window leaves m at -inf: shift by 0 there
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            l_sum = l_sum * jnp.exp(m - m_safe) + jnp.sum(jnp.exp(s - m_safe[..., None]), axis=-1)
            return m_new, l_sum

        init = (
            jnp.full((B, K, G, bt), -jnp.inf, jnp.float32),
            jnp.zeros((B, K, G, bt), jnp.float32),
        )
        m, l_sum = lax.fori_loop(0, qn + 1, step, init)  # key block kn <= qn holds all j <= i
        return m + jnp.log(l_sum)

    lse_NBKGb = lax.map(row_lse, jnp.arange(N))
    lse_BKGT = jnp.moveaxis(lse_NBKGb, 0, 3).reshape(B, K, G, Tp)

    # Pass 2: for each key, the last query row whose probability passes tau in any head.
    def last_row(kn):
        def step(qn, last_BKb):
            s, i_b1, _ = scores(qn, kn)
            lse = lax.dynamic_slice_in_dim(lse_BKGT, qn * bt, bt, axis=3)[..., None]
            hit = jnp.any(jnp.exp(s - lse) > tau, axis=2) & (i_b1 < T)  # [B, K, rows, keys]
            return jnp.maximum(last_BKb, jnp.max(jnp.where(hit, i_b1, -1), axis=2))

        return lax.fori_loop(kn, N, step, jnp.full((B, K, bt), -1, jnp.int32))

    last_NBKb = lax.map(last_row, jnp.arange(N))
    last_BKT = jnp.moveaxis(last_NBKb, 0, 2).reshape(B, K, Tp)[:, :, :T]
    return jnp.maximum(last_BKT - jnp.arange(T, dtype=jnp.int32), 0).astype(jnp.int32)


def _lse_kernel(
    q_ref,  # [G, bq, D] queries of one kv head's group, rows qn * bq ...
    k_ref,  # [bk, D] keys kn * bk ...
    lse_ref,  # [G, bq, 1] float32 output, written at the last live key block
    m_sc,  # [G, bq, 1] float32 running max
    l_sc,  # [G, bq, 1] float32 running sum
    *,
    scale: float,
    seq_len: int,
    group: int,
) -> None:
    qn, kn = pl.program_id(2), pl.program_id(3)
    bq, bk = q_ref.shape[1], k_ref.shape[0]
    last_kn = lax.div((qn + 1) * bq - 1, bk)  # the last key block with some j <= i

    @pl.when(kn == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)

    @pl.when(kn <= last_kn)
    def _accumulate():
        i_b1 = qn * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
        j_1b = kn * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
        mask_bb = (i_b1 >= j_1b) & (j_1b < seq_len)
        k_bD = k_ref[...].astype(jnp.float32)
        for g in range(group):
            s_bb = _dot_t(q_ref[g].astype(jnp.float32), k_bD) * scale
            s_bb = jnp.where(mask_bb, s_bb, -jnp.inf)
            m_prev = m_sc[g]
            m_new = jnp.maximum(m_prev, jnp.max(s_bb, axis=1, keepdims=True))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            l_sc[g] = l_sc[g] * jnp.exp(m_prev - m_safe) + jnp.sum(
                jnp.exp(s_bb - m_safe), axis=1, keepdims=True
            )
            m_sc[g] = m_new

    @pl.when(kn == pl.num_programs(3) - 1)
    def _finalize():
        lse_ref[...] = m_sc[...] + jnp.log(l_sc[...])


def _last_row_kernel(
    q_ref,  # [G, bq, D] queries of one kv head's group, rows qn * bq ...
    lse_ref,  # [G, bq, 1] float32 row log-sum-exp from pass 1
    k_ref,  # [bk, D] keys kn * bk ...
    L_ref,  # [1, bk] int32 output lifespans, written at the last query block
    last_sc,  # [1, bk] int32 largest row i seen with p > tau (-1: none)
    *,
    scale: float,
    tau: float,
    seq_len: int,
    group: int,
) -> None:
    kn, qn = pl.program_id(2), pl.program_id(3)
    bq, bk = q_ref.shape[1], k_ref.shape[0]
    first_qn = lax.div(kn * bk, bq)  # the first query block with some i >= j

    @pl.when(qn == 0)
    def _init():
        last_sc[...] = jnp.full(last_sc.shape, -1, jnp.int32)

    @pl.when(qn >= first_qn)
    def _scan():
        i_b1 = qn * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
        j_1b = kn * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
        mask_bb = (i_b1 >= j_1b) & (i_b1 < seq_len)
        k_bD = k_ref[...].astype(jnp.float32)
        hit_bb = jnp.zeros((bq, bk), jnp.bool_)
        for g in range(group):
            s_bb = _dot_t(q_ref[g].astype(jnp.float32), k_bD) * scale
            hit_bb = hit_bb | (jnp.exp(s_bb - lse_ref[g]) > tau)
        hit_bb = hit_bb & mask_bb
        row_last_1b = jnp.max(jnp.where(hit_bb, i_b1, -1), axis=0, keepdims=True)
        last_sc[...] = jnp.maximum(last_sc[...], row_last_1b)

    @pl.when(qn == pl.num_programs(3) - 1)
    def _finalize():
        j_1b = kn * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        L_ref[...] = jnp.maximum(last_sc[...] - j_1b, 0)


def _block_sizes(
    block_q: int, block_k: int, q_shape: tuple[int, ...], interpret: Any
) -> tuple[int, int]:
    """(bq, bk): the blocks capped at T; off interpret mode, checks they tile on TPU."""
    T = q_shape[2]
    bq = min(block_q, T)
    bk = min(block_k, T)
    if not interpret and ((bq < T and bq % 8) or (bk < T and bk % 128)):
        raise ValueError(
            f"on TPU block_q={block_q} must be a multiple of 8 and block_k={block_k} a multiple "
            f"of 128 (or >= T={T}, q_BHTD {q_shape}); other sizes are only for interpret mode"
        )
    return bq, bk


def _compiler_params() -> pltpu.CompilerParams:
    """Both passes: batch, kv head and outer block axes parallel; the inner axis carries."""
    return pltpu.CompilerParams(dimension_semantics=(pltpu.PARALLEL,) * 3 + (pltpu.ARBITRARY,))


def _lse_call(
    *, B: int, K: int, G: int, D: int, T: int, bq: int, bk: int, scale: float, interpret: Any
):
    """Pass 1's ``pl.pallas_call``, grid (B, K, nq, nk): (q_BHTD, k_BKTD) padded to whole
    blocks -> lse_BHT1 float32 [B, H, nq * bq, 1]. Key blocks above the diagonal re-point at
    the last live one, so they are not fetched."""
    nq, nk = pl.cdiv(T, bq), pl.cdiv(T, bk)
    sq = pl.Squeezed()

    def last_live_kn(qn):
        return jnp.minimum(lax.div((qn + 1) * bq - 1, bk), nk - 1)

    return pl.pallas_call(
        functools.partial(_lse_kernel, scale=scale, seq_len=T, group=G),
        out_shape=jax.ShapeDtypeStruct((B, K * G, nq * bq, 1), jnp.float32),
        grid=(B, K, nq, nk),
        in_specs=[
            pl.BlockSpec((sq, G, bq, D), lambda b, h, qn, kn: (b, h, qn, 0)),
            pl.BlockSpec(
                (sq, sq, bk, D),
                lambda b, h, qn, kn: (b, h, jnp.minimum(kn, last_live_kn(qn)), 0),
            ),
        ],
        out_specs=pl.BlockSpec((sq, G, bq, 1), lambda b, h, qn, kn: (b, h, qn, 0)),
        scratch_shapes=[pltpu.VMEM((G, bq, 1), jnp.float32)] * 2,
        compiler_params=_compiler_params(),
        interpret=interpret,
        name="smartkv_lifespan_lse",
    )


def _last_row_call(
    *,
    B: int,
    K: int,
    G: int,
    D: int,
    T: int,
    bq: int,
    bk: int,
    scale: float,
    tau: float,
    interpret: Any,
):
    """Pass 2's ``pl.pallas_call``, grid (B, K, nk, nq): (q_BHTD, lse_BHT1, k_BKTD) padded to
    whole blocks -> L_BK1T int32 [B, K, 1, nk * bk]. Query blocks above the diagonal re-point
    at the first live one, so they are not fetched."""
    nq, nk = pl.cdiv(T, bq), pl.cdiv(T, bk)
    sq = pl.Squeezed()

    def first_live_qn(kn):
        return lax.div(kn * bk, bq)

    return pl.pallas_call(
        functools.partial(_last_row_kernel, scale=scale, tau=tau, seq_len=T, group=G),
        out_shape=jax.ShapeDtypeStruct((B, K, 1, nk * bk), jnp.int32),
        grid=(B, K, nk, nq),
        in_specs=[
            pl.BlockSpec(
                (sq, G, bq, D),
                lambda b, h, kn, qn: (b, h, jnp.maximum(qn, first_live_qn(kn)), 0),
            ),
            pl.BlockSpec(
                (sq, G, bq, 1),
                lambda b, h, kn, qn: (b, h, jnp.maximum(qn, first_live_qn(kn)), 0),
            ),
            pl.BlockSpec((sq, sq, bk, D), lambda b, h, kn, qn: (b, h, kn, 0)),
        ],
        out_specs=pl.BlockSpec((sq, sq, 1, bk), lambda b, h, kn, qn: (b, h, 0, kn)),
        scratch_shapes=[pltpu.VMEM((1, bk), jnp.int32)],
        compiler_params=_compiler_params(),
        interpret=interpret,
        name="smartkv_lifespan_last_row",
    )


def lifespan(
    q_BHTD: jax.Array,
    k_BKTD: jax.Array,
    *,
    tau: float = 0.05,
    scale: float | None = None,
    block_q: int = 128,
    block_k: int = 128,
    interpret: Any = False,
) -> jax.Array:
    """Lifespans as two TPU Pallas kernels, never holding more than a block of scores.

    Pass 1, grid (B, K, T/block_q, T/block_k): per query row the log-sum-exp over its causal
    keys (online softmax; key blocks above the diagonal are skipped and not fetched).
    Pass 2, grid (B, K, T/block_k, T/block_q): per key the largest row i >= j with
    exp(s - lse) > tau in any head of the GQA group (query blocks above the diagonal are
    skipped and not fetched). T need not be a multiple of the blocks (zero padding, masked).

    Args:
      q_BHTD: post-RoPE queries [B, H, T, D], float32 or bfloat16.
      k_BKTD: post-RoPE keys [B, K, T, D], float32 or bfloat16.
      tau: attention-probability threshold (strict: A > tau counts).
      scale: logit scale; defaults to D ** -0.5.
      block_q: query rows per block (on TPU a multiple of 8, or >= T).
      block_k: keys per block (on TPU a multiple of 128, or >= T).
      interpret: passed to ``pl.pallas_call`` (False, True or ``pltpu.InterpretParams``).

    Returns:
      L_BKT: int32 [B, K, T], lifespan of each key in tokens (0 when no query passes tau).
    """
    B, H, K, T, D = _check_inputs(q_BHTD, k_BKTD)
    _check_block("block_q", block_q)
    _check_block("block_k", block_k)
    G = H // K
    scale = float(D**-0.5 if scale is None else scale)
    tau = float(tau)
    bq, bk = _block_sizes(block_q, block_k, q_BHTD.shape, interpret)
    nq, nk = pl.cdiv(T, bq), pl.cdiv(T, bk)
    q_BHTD = _blocked(q_BHTD, nq, bq)
    k_BKTD = _blocked(k_BKTD, nk, bk)
    dims = dict(B=B, K=K, G=G, D=D, T=T, bq=bq, bk=bk)
    lse_BHT1 = _lse_call(**dims, scale=scale, interpret=interpret)(q_BHTD, k_BKTD)
    L_BK1T = _last_row_call(**dims, scale=scale, tau=tau, interpret=interpret)(
        q_BHTD, lse_BHT1, k_BKTD
    )
    return L_BK1T.reshape(B, K, nk * bk)[:, :, :T]

"""Tests for pallas_kernels.decode_attention: kernel (TPU interpret mode) vs jnp reference vs
a dense numpy computation, over ragged caches."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.decode_attention import decode_attention, reference_decode_attention

INTERPRET = pltpu.InterpretParams(out_of_bounds_reads="raise", uninitialized_memory="nan")
RTOL = ATOL = 1e-5


def numpy_attention(q_BHTD, k_BKSD, v_BKSD, slot_pos_BKS, q_pos_BT, scale=None, window=0):
    """Straightforward float64 loop over (b, h, t): returns (out_BHTD, lse_BHT). window W:
    a query at t sees slots at positions > t - W."""
    q = np.asarray(q_BHTD, np.float64)
    k = np.asarray(k_BKSD, np.float64)
    v = np.asarray(v_BKSD, np.float64)
    B, H, T, D = q.shape
    K = k.shape[1]
    scale = D**-0.5 if scale is None else scale
    out = np.zeros((B, H, T, D))
    lse = np.full((B, H, T), -np.inf)
    for b in range(B):
        for h in range(H):
            kv = h // (H // K)
            for t in range(T):
                valid = (slot_pos_BKS[b, kv] >= 0) & (slot_pos_BKS[b, kv] <= q_pos_BT[b, t])
                if window:
                    valid &= slot_pos_BKS[b, kv] > q_pos_BT[b, t] - window
                if not valid.any():
                    continue
                s = k[b, kv][valid] @ q[b, h, t] * scale
                m = s.max()
                w = np.exp(s - m)
                out[b, h, t] = w @ v[b, kv][valid] / w.sum()
                lse[b, h, t] = m + np.log(w.sum())
    return out, lse


def make_case(kind, B, H, K, T, S, D, dtype=np.float32, seed=0):
    """Random q/k/v and a slot/query position layout named by ``kind``."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, H, T, D)).astype(np.float32)
    k = rng.standard_normal((B, K, S, D)).astype(np.float32)
    v = rng.standard_normal((B, K, S, D)).astype(np.float32)
    q_pos = np.tile(np.arange(S, S + T, dtype=np.int32), (B, 1))  # queries after the cache
    if kind == "empty":
        slot_pos = np.full((B, K, S), -1, np.int32)
    elif kind == "one_slot":
        slot_pos = np.full((B, K, S), -1, np.int32)
        slot_pos[:, :, S - 1] = 3  # in the last, partial block
        slot_pos[0, 0, S - 1] = -1
        slot_pos[0, 0, 0] = 0  # (0, 0) has its only slot first instead
    elif kind == "full":
        slot_pos = np.broadcast_to(np.arange(S, dtype=np.int32), (B, K, S)).copy()
    elif kind == "random":
        slot_pos = np.stack([rng.permutation(3 * S)[:S] for _ in range(B * K)], axis=0).reshape(
            B, K, S
        )
        slot_pos = np.where(rng.random((B, K, S)) < 0.3, -1, slot_pos).astype(np.int32)
        # Queries inside the position range, so causality masks some slots; one padding query.
        q_pos = rng.integers(0, 3 * S, (B, T)).astype(np.int32)
        q_pos[-1, -1] = -1
    elif kind == "sparse_blocks":
        # Only a few slots live, in a middle block; others empty or in the future.
        slot_pos = np.full((B, K, S), -1, np.int32)
        slot_pos[:, :, S // 2] = 5
        slot_pos[:, :, S // 2 + 1] = 7
        slot_pos[:, 0, 1] = 10_000  # in the future of every query: masked
        q_pos = np.full((B, T), 6, np.int32) + np.arange(T, dtype=np.int32)
        q_pos[0, 0] = -1  # padding query
    else:
        raise ValueError(kind)
    if dtype != np.float32:
        q, k, v = (jnp.asarray(x, dtype) for x in (q, k, v))
    return q, k, v, slot_pos, q_pos


CASES = [
    # kind, B, H, K, T, S, D, block_s, dtype
    ("empty", 1, 6, 2, 1, 16, 8, 8, np.float32),
    ("one_slot", 2, 6, 2, 1, 13, 8, 8, np.float32),
    ("full", 1, 2, 2, 4, 32, 16, 16, np.float32),
    ("random", 2, 6, 2, 5, 37, 8, 16, np.float32),
    ("random", 1, 3, 3, 1, 20, 8, 128, np.float32),
    ("sparse_blocks", 2, 4, 2, 3, 40, 8, 8, np.float32),
    ("random", 1, 4, 2, 2, 24, 16, 8, jnp.bfloat16),
]


@pytest.mark.parametrize("kind,B,H,K,T,S,D,block_s,dtype", CASES)
def test_kernel_matches_reference_and_numpy(kind, B, H, K, T, S, D, block_s, dtype):
    q, k, v, slot_pos, q_pos = make_case(kind, B, H, K, T, S, D, dtype)
    kernel = functools.partial(decode_attention, block_s=block_s, interpret=INTERPRET)
    out, lse = jax.jit(kernel)(q, k, v, slot_pos, q_pos)
    ref_out, ref_lse = jax.jit(reference_decode_attention)(q, k, v, slot_pos, q_pos)
    assert out.shape == (B, H, T, D) and out.dtype == jnp.float32
    assert lse.shape == (B, H, T) and lse.dtype == jnp.float32
    assert not np.isnan(np.asarray(out)).any() and not np.isnan(np.asarray(lse)).any()
    np.testing.assert_allclose(out, ref_out, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(lse, ref_lse, rtol=RTOL, atol=ATOL)  # -inf must match -inf

    # The bf16 inputs are exactly representable in float64, so numpy is tight too.
    np_out, np_lse = numpy_attention(
        np.asarray(q, np.float32), np.asarray(k, np.float32), np.asarray(v, np.float32),
        slot_pos, q_pos,
    )  # fmt: skip
    np.testing.assert_allclose(ref_out, np_out, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(ref_lse, np_lse, rtol=RTOL, atol=ATOL)

    # No valid slot: exactly zero output and -inf lse.
    none_BHT = np.isneginf(np_lse)
    if kind in ("empty",):
        assert none_BHT.all()
    if kind in ("full", "one_slot"):
        assert not none_BHT.any()
    if kind in ("random", "sparse_blocks"):
        assert none_BHT[-1, :, -1].all() or none_BHT[0, :, 0].all()  # the padding query
    assert (np.asarray(out)[none_BHT] == 0).all()


def test_custom_scale_and_jit():
    q, k, v, slot_pos, q_pos = make_case("random", 1, 4, 2, 3, 19, 8, seed=1)
    fn = jax.jit(functools.partial(decode_attention, scale=0.3, block_s=8, interpret=INTERPRET))
    out, lse = fn(q, k, v, slot_pos, q_pos)
    ref_out, ref_lse = reference_decode_attention(q, k, v, slot_pos, q_pos, scale=0.3)
    np_out, np_lse = numpy_attention(q, k, v, slot_pos, q_pos, scale=0.3)
    np.testing.assert_allclose(out, ref_out, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(lse, ref_lse, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(ref_out, np_out, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(ref_lse, np_lse, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("window", [1, 7, 40])
def test_sliding_window(window):
    """Slots older than the window are masked for each query by its own position; blocks
    with no slot inside any query's window are skipped."""
    q, k, v, slot_pos, q_pos = make_case("random", 2, 4, 2, 5, 37, 8, seed=2)
    fn = functools.partial(decode_attention, window=window, block_s=8, interpret=INTERPRET)
    out, lse = jax.jit(fn)(q, k, v, slot_pos, q_pos)
    ref_out, ref_lse = reference_decode_attention(q, k, v, slot_pos, q_pos, window=window)
    np_out, np_lse = numpy_attention(q, k, v, slot_pos, q_pos, window=window)
    np.testing.assert_allclose(out, ref_out, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(lse, ref_lse, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(ref_out, np_out, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(ref_lse, np_lse, rtol=RTOL, atol=ATOL)
    full_lse = numpy_attention(q, k, v, slot_pos, q_pos)[1]
    assert window == 40 or not np.allclose(np_lse, full_lse)  # the window did mask something


def test_lse_merges_two_caches():
    """Attention over a cache split in two, merged by lse, equals attention over the whole."""
    q, k, v, slot_pos, q_pos = make_case("random", 2, 6, 2, 4, 24, 8, seed=2)
    full_out, full_lse = reference_decode_attention(q, k, v, slot_pos, q_pos)
    o1, l1 = reference_decode_attention(q, k[:, :, :10], v[:, :, :10], slot_pos[:, :, :10], q_pos)
    o2, l2 = reference_decode_attention(q, k[:, :, 10:], v[:, :, 10:], slot_pos[:, :, 10:], q_pos)
    lse = jnp.logaddexp(l1, l2)
    safe = jnp.where(jnp.isneginf(lse), 0.0, lse)
    out = jnp.exp(l1 - safe)[..., None] * o1 + jnp.exp(l2 - safe)[..., None] * o2
    np.testing.assert_allclose(out, full_out, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(lse, full_lse, rtol=RTOL, atol=ATOL)


def _bad(name):
    q = np.zeros((1, 6, 2, 8), np.float32)
    k = np.zeros((1, 2, 10, 8), np.float32)
    v = np.zeros((1, 2, 10, 8), np.float32)
    slot_pos = np.zeros((1, 2, 10), np.int32)
    q_pos = np.zeros((1, 2), np.int32)
    if name == "gqa":
        k, v, slot_pos = k[:, :1].repeat(4, 1), v[:, :1].repeat(4, 1), slot_pos[:, :1].repeat(4, 1)
    elif name == "kv_mismatch":
        v = v[:, :, :9]
    elif name == "head_dim":
        k, v = k[..., :4], v[..., :4]
    elif name == "slot_pos_shape":
        slot_pos = slot_pos[:, :, :9]
    elif name == "q_pos_shape":
        q_pos = q_pos[:, :1]
    elif name == "q_rank":
        q = q[0]
    elif name == "int_q":
        q = q.astype(np.int32)
    elif name == "float_slot_pos":
        slot_pos = slot_pos.astype(np.float32)
    return q, k, v, slot_pos, q_pos


@pytest.mark.parametrize(
    "name,match",
    [
        ("gqa", "multiple of kv heads"),
        ("kv_mismatch", "same shape"),
        ("head_dim", "k_BKSD shape"),
        ("slot_pos_shape", "slot_pos_BKS"),
        ("q_pos_shape", "q_pos_BT"),
        ("q_rank", "q_BHTD must be 4-D"),
        ("int_q", "q_BHTD must be a float"),
        ("float_slot_pos", "slot_pos_BKS must be an integer"),
    ],
)
@pytest.mark.parametrize("fn", ["kernel", "reference"])
def test_bad_inputs_raise(name, match, fn):
    args = _bad(name)
    with pytest.raises(ValueError, match=match):
        if fn == "kernel":
            decode_attention(*args, interpret=INTERPRET)
        else:
            reference_decode_attention(*args)


def test_bad_block_s_raises():
    with pytest.raises(ValueError, match="block_s"):
        decode_attention(*_bad("none"), block_s=0, interpret=INTERPRET)


def test_tpu_block_s_must_be_lane_aligned():
    with pytest.raises(ValueError, match="multiple of 128"):
        decode_attention(*_bad("none"), block_s=8)  # S = 10 > 8, not interpreting

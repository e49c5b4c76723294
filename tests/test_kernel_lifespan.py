"""Tests for pallas_kernels.lifespan: kernel (TPU interpret mode) vs blockwise jnp reference vs
dense jnp vs a literal numpy computation, including hand-built cases at the tau boundary."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.lifespan import dense_lifespan, lifespan, reference_lifespan

INTERPRET = pltpu.InterpretParams(out_of_bounds_reads="raise", uninitialized_memory="nan")


def numpy_lifespan(q_BHTD, k_BKTD, tau=0.05, scale=None, window=0):
    """The docs/design.md definition, literally, in float64 (window W: query i sees keys
    j > i - W)."""
    q = np.asarray(q_BHTD, np.float64)
    k = np.asarray(k_BKTD, np.float64)
    B, H, T, D = q.shape
    K = k.shape[1]
    G = H // K
    scale = D**-0.5 if scale is None else scale
    L = np.zeros((B, K, T), np.int32)
    for b in range(B):
        for h in range(H):
            s = q[b, h] @ k[b, h // G].T * scale
            seen = np.tril(np.ones((T, T), bool))
            if window:
                seen &= np.triu(np.ones((T, T), bool), -(window - 1))
            s = np.where(seen, s, -np.inf)
            a = np.exp(s - s.max(axis=1, keepdims=True))
            a /= a.sum(axis=1, keepdims=True)
            for j in range(T):
                rows = np.nonzero(a[j:, j] > tau)[0]
                if rows.size:
                    L[b, h // G, j] = max(L[b, h // G, j], rows.max())  # = i - j
    return L


def run_all(q, k, *, tau=0.05, scale=None, block_q=8, block_k=8, ref_block=8):
    """(kernel, blockwise reference, dense) lifespans; the kernel is skipped (None) when
    block_q is None, to keep interpret-mode time down where it adds no coverage."""
    if block_q is None:
        got = None
    else:
        kernel = functools.partial(
            lifespan, tau=tau, scale=scale, block_q=block_q, block_k=block_k, interpret=INTERPRET
        )
        got = np.asarray(jax.jit(kernel)(q, k))
    ref = jax.jit(functools.partial(reference_lifespan, tau=tau, scale=scale, block=ref_block))(
        q, k
    )
    dense = jax.jit(functools.partial(dense_lifespan, tau=tau, scale=scale))(q, k)
    for x in (got, ref, dense):
        assert x is None or (x.shape == k.shape[:3] and x.dtype == jnp.int32)
    return got, np.asarray(ref), np.asarray(dense)


def assert_all_equal(want, *results):
    for x in results:
        if x is not None:
            np.testing.assert_array_equal(x, want)


RANDOM_CASES = [
    # B, H, K, T, D, block_q, block_k, ref_block, dtype
    (2, 6, 2, 19, 8, 8, 16, 8, np.float32),  # GQA, blocks do not divide T (pad rows matter)
    (1, 2, 2, 32, 16, 16, 16, 8, jnp.bfloat16),  # H == K, blocks divide T, bfloat16
    (1, 4, 1, 20, 8, 128, 128, 128, np.float32),  # one block bigger than T
    (1, 2, 1, 1, 8, 8, 8, 8, np.float32),  # T == 1: L = 0
]


@pytest.mark.parametrize("B,H,K,T,D,block_q,block_k,ref_block,dtype", RANDOM_CASES)
def test_random_kernel_reference_dense_numpy(B, H, K, T, D, block_q, block_k, ref_block, dtype):
    rng = np.random.default_rng(T)
    q = (2.0 * rng.standard_normal((B, H, T, D))).astype(np.float32)
    k = (2.0 * rng.standard_normal((B, K, T, D))).astype(np.float32)
    q, k = jnp.asarray(q, dtype), jnp.asarray(k, dtype)
    got, ref, dense = run_all(q, k, block_q=block_q, block_k=block_k, ref_block=ref_block)
    want = numpy_lifespan(np.asarray(q, np.float32), np.asarray(k, np.float32))
    assert_all_equal(want, dense, ref, got)
    if T > 1:
        assert 0 < want.max() <= T - 1  # the case is not trivial
    else:
        assert (want == 0).all()


def uniform_and_peaked(T, D=4, big=6.0):
    """B=1, H=4, K=2. Query heads 0, 2, 3 have q = 0 (uniform attention A[i, j] = 1/(i+1));
    head 1 (kv head 0's group) puts nearly all weight on key 0 from every row."""
    q = np.zeros((1, 4, T, D), np.float32)
    k = np.zeros((1, 2, T, D), np.float32)
    q[0, 1, :, 0] = big
    k[0, 0, 0, 0] = big
    return q, k


@pytest.mark.parametrize(
    "tau,last_row,block_q",
    [
        (1 / 20 + 1e-4, 18, 8),  # A = 1/20 at i = 19 is just under tau: last passing row 18
        (1 / 20 - 1e-4, 19, 8),  # ... just over tau: row 19 passes, 1/21 at row 20 does not
        (1 / 11 + 1e-4, 9, None),
    ],
)
def test_tau_boundary_and_gqa_max(tau, last_row, block_q):
    T = 24
    q, k = uniform_and_peaked(T)
    got, ref, dense = run_all(q, k, tau=tau, block_q=block_q, block_k=16, ref_block=16)
    j = np.arange(T)
    uniform_L = np.maximum(last_row - j, 0)
    want = np.stack([uniform_L, uniform_L])[None].astype(np.int32)
    want[0, 0, 0] = T - 1  # GQA max: head 1 alone keeps key 0 alive to the end
    np.testing.assert_array_equal(numpy_lifespan(q, k, tau=tau), want)
    assert_all_equal(want, dense, ref, got)


@pytest.mark.parametrize("case", ["tau_one", "self_only", "uniform_high_tau"])
def test_zero_lifespans(case):
    T, D = 12, 16
    if case == "tau_one":  # no probability exceeds 1
        q, k = uniform_and_peaked(T)
        tau = 1.0
    elif case == "self_only":  # each query attends (almost) only to its own key
        q = np.zeros((1, 1, T, D), np.float32)
        q[0, 0, np.arange(T), np.arange(T)] = 8.0
        k = q.copy()
        tau = 0.05
    else:  # uniform attention, tau above 1/2: only the first row's key 0 passes, at i = j
        q, k = np.zeros((1, 2, T, D), np.float32), np.zeros((1, 1, T, D), np.float32)
        tau = 0.6
    block_q = 8 if case == "self_only" else None
    got, ref, dense = run_all(q, k, tau=tau, block_q=block_q, block_k=8, ref_block=8)
    want = np.zeros((1, k.shape[1], T), np.int32)
    np.testing.assert_array_equal(numpy_lifespan(q, k, tau=tau), want)
    assert_all_equal(want, dense, ref, got)


def test_custom_scale_reference_only():
    rng = np.random.default_rng(7)
    q = rng.standard_normal((1, 4, 29, 8)).astype(np.float32)
    k = rng.standard_normal((1, 2, 29, 8)).astype(np.float32)
    want = numpy_lifespan(q, k, tau=0.1, scale=0.9)
    ref = jax.jit(functools.partial(reference_lifespan, tau=0.1, scale=0.9, block=8))(q, k)
    dense = jax.jit(functools.partial(dense_lifespan, tau=0.1, scale=0.9))(q, k)
    assert_all_equal(want, ref, dense)


@pytest.mark.parametrize("window", [1, 5, 16])
def test_sliding_window_reference_and_dense(window):
    """A sliding-window layer: keys older than W positions get no attention, so no lifespan
    reaches W, and the softmax runs over the window alone."""
    rng = np.random.default_rng(8)
    q = rng.standard_normal((2, 4, 37, 8)).astype(np.float32)
    k = rng.standard_normal((2, 2, 37, 8)).astype(np.float32)
    want = numpy_lifespan(q, k, tau=0.05, window=window)
    assert want.max() < window and (window == 1 or want.max() > 0)
    assert not np.array_equal(want, numpy_lifespan(q, k, tau=0.05)) or window == 1
    ref = jax.jit(functools.partial(reference_lifespan, tau=0.05, window=window, block=8))(q, k)
    dense = jax.jit(functools.partial(dense_lifespan, tau=0.05, window=window))(q, k)
    assert_all_equal(want, ref, dense)


def _bad(name):
    q = np.zeros((1, 6, 10, 8), np.float32)
    k = np.zeros((1, 2, 10, 8), np.float32)
    if name == "gqa":
        k = np.zeros((1, 4, 10, 8), np.float32)
    elif name == "tokens":
        k = k[:, :, :9]
    elif name == "head_dim":
        k = k[..., :4]
    elif name == "q_rank":
        q = q[0]
    elif name == "int_k":
        k = k.astype(np.int32)
    elif name == "empty":
        q, k = q[:, :, :0], k[:, :, :0]
    return q, k


@pytest.mark.parametrize(
    "name,match",
    [
        ("gqa", "multiple of kv heads"),
        ("tokens", "k_BKTD shape"),
        ("head_dim", "k_BKTD shape"),
        ("q_rank", "q_BHTD must be 4-D"),
        ("int_k", "k_BKTD must be a float"),
        ("empty", "at least one token"),
    ],
)
@pytest.mark.parametrize(
    "fn",
    [
        functools.partial(lifespan, interpret=INTERPRET),
        reference_lifespan,
        dense_lifespan,
    ],
    ids=["kernel", "reference", "dense"],
)
def test_bad_inputs_raise(name, match, fn):
    with pytest.raises(ValueError, match=match):
        fn(*_bad(name))


@pytest.mark.parametrize("kwargs", [{"block_q": 0}, {"block_k": -8}])
def test_bad_blocks_raise(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        lifespan(*_bad("none"), interpret=INTERPRET, **kwargs)
    with pytest.raises(ValueError, match="block"):
        reference_lifespan(*_bad("none"), block=0)


@pytest.mark.parametrize("kwargs", [{"block_q": 4}, {"block_k": 8}])
def test_tpu_blocks_must_be_aligned(kwargs):
    with pytest.raises(ValueError, match="on TPU"):
        lifespan(*_bad("none"), **kwargs)  # T = 10, not interpreting

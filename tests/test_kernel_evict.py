"""Tests for pallas_kernels.evict: kernel (TPU interpret mode) vs jnp reference vs a literal
numpy loop, for decode (C = 1) and chunk (C > 1) inserts."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.evict import (
    evict_insert,
    reference_evict_insert,
    scatter_rows,
    sorted_evict_slots,
)

INTERPRET = pltpu.InterpretParams(out_of_bounds_reads="raise", uninitialized_memory="nan")
INF = np.float32(np.inf)


def numpy_evict_insert(k, v, pos, score, rank, new_k, new_v, new_pos, new_score, new_rank):
    """The documented semantics, literally: a Python loop over (b, kv) and new tokens."""
    k, v = np.array(k), np.array(v)
    pos, score, rank = np.array(pos), np.array(score), np.array(rank)
    B, K, _, _ = k.shape
    for b in range(B):
        for h in range(K):
            for i in range(new_pos.shape[2]):
                if new_pos[b, h, i] < 0:
                    continue
                j = int(np.argmin(rank[b, h]))  # first index on ties
                if new_rank[b, h, i] > rank[b, h, j]:
                    k[b, h, j] = np.asarray(new_k[b, h, i]).astype(k.dtype)
                    v[b, h, j] = np.asarray(new_v[b, h, i]).astype(v.dtype)
                    pos[b, h, j] = new_pos[b, h, i]
                    score[b, h, j] = new_score[b, h, i]
                    rank[b, h, j] = new_rank[b, h, i]
    return k, v, pos, score, rank


def make_case(kind, B, K, S, C, D, seed=0):
    """Cache state and new tokens; rank -inf marks empty slots, +inf protected ones."""
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((B, K, S, D)).astype(np.float32)
    v = rng.standard_normal((B, K, S, D)).astype(np.float32)
    pos = rng.permutation(B * K * S).astype(np.int32).reshape(B, K, S)
    score = rng.standard_normal((B, K, S)).astype(np.float32)
    rank = rng.standard_normal((B, K, S)).astype(np.float32)
    new_k = rng.standard_normal((B, K, C, D)).astype(np.float32)
    new_v = rng.standard_normal((B, K, C, D)).astype(np.float32)
    new_pos = (1000 + np.arange(C, dtype=np.int32)) * np.ones((B, K, 1), np.int32)
    new_score = rng.standard_normal((B, K, C)).astype(np.float32)
    new_rank = rng.standard_normal((B, K, C)).astype(np.float32)
    if kind == "random":
        empty = rng.random((B, K, S)) < 0.25
        pos[empty], rank[empty] = -1, -INF
        rank[rng.random((B, K, S)) < 0.15] = INF
        new_pos[rng.random((B, K, C)) < 0.2] = -1
    elif kind == "empty_cache":
        pos[:], rank[:] = -1, -INF
    elif kind == "some_empty":
        pos[:, :, 1::2], rank[:, :, 1::2] = -1, -INF
    elif kind == "all_dropped":
        new_rank = rank.min() - 1.0 - rng.random((B, K, C)).astype(np.float32)
    elif kind == "protected":
        rank[:] = INF
        rank[:, :, S // 2] = 0.0  # the only replaceable slot
        new_rank[:] = np.abs(new_rank) + 1.0  # every valid new token beats it
        new_rank[:, :, 0] = INF  # a protected new token (e.g. a sink) still goes in once
    elif kind == "invalid_new":
        new_pos[:, :, ::2] = -1
        new_rank[:, :, ::2] = INF  # would win if it were valid
    elif kind == "ties":
        rank[:] = np.float32(0.5)
        rank[:, :, -1] = np.float32(0.25)
        new_rank[:] = np.float32(0.75)
        new_rank[:, :, 2] = np.float32(0.5)  # equal to the lowest rank then: not strictly above
    else:
        raise ValueError(kind)
    return k, v, pos, score, rank, new_k, new_v, new_pos, new_score, new_rank


CASES = [
    # kind, B, K, S, C, D
    ("random", 2, 2, 8, 1, 4),
    ("random", 2, 3, 6, 9, 8),
    ("empty_cache", 1, 2, 8, 3, 4),
    ("some_empty", 2, 1, 7, 1, 4),
    ("all_dropped", 1, 2, 5, 4, 4),
    ("protected", 1, 2, 6, 5, 4),
    ("invalid_new", 2, 1, 4, 6, 4),
    ("ties", 1, 1, 5, 3, 4),
]


def _assert_equal(got, want):
    for name, a, b in zip(("k", "v", "pos", "score", "rank"), got, want, strict=True):
        assert np.asarray(a).dtype == np.asarray(b).dtype, name
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


@pytest.mark.parametrize("kind,B,K,S,C,D", CASES)
def test_kernel_matches_reference_and_numpy(kind, B, K, S, C, D):
    args = make_case(kind, B, K, S, C, D)
    want = numpy_evict_insert(*args)
    ref = jax.jit(reference_evict_insert)(*args)
    _assert_equal(ref, want)
    got = jax.jit(functools.partial(evict_insert, interpret=INTERPRET))(*args)
    _assert_equal(got, want)

    k0, _, pos0, _, rank0, new_k, _, new_pos, _, _ = args
    _, _, pos1, _, rank1 = want
    if kind == "empty_cache":  # filled in order, lowest slot first
        np.testing.assert_array_equal(pos1[:, :, :C], new_pos)
        assert (pos1[:, :, C:] == -1).all()
    if kind == "some_empty":  # C == 1 goes to the first empty slot
        np.testing.assert_array_equal(pos1[:, :, 1], new_pos[:, :, 0])
        np.testing.assert_array_equal(np.asarray(got[0])[:, :, 1], new_k[:, :, 0])
    if kind == "all_dropped":
        np.testing.assert_array_equal(pos1, pos0)
        np.testing.assert_array_equal(np.asarray(got[0]), k0)
    if kind == "protected":
        keep = np.isposinf(rank0)
        keep[:, :, S // 2] = False
        np.testing.assert_array_equal(pos1[keep], pos0[keep])
        np.testing.assert_array_equal(pos1[:, :, S // 2], new_pos[:, :, 0])  # +inf new stays
    if kind == "invalid_new":
        assert not (pos1 == -1).any() and not np.isposinf(rank1).any()
        assert np.isin(new_pos[:, :, 1::2], pos1).any()
    if kind == "ties":  # lowest rank first (last slot), then ties broken by lowest index
        np.testing.assert_array_equal(pos1[0, 0, [4, 0]], new_pos[0, 0, [0, 1]])
        assert new_pos[0, 0, 2] not in pos1  # an equal rank does not replace


@pytest.mark.parametrize("kind,B,K,S,C,D", CASES + [("random", 2, 3, 40, 64, 4)])
def test_sorted_chunk_path_keeps_the_greedy_set(kind, B, K, S, C, D):
    """The one-sort chunk path keeps exactly what the greedy rule keeps, ties included, with
    each kept token's k row in its slot (slots may be permuted)."""
    k, v, pos, score, rank, new_k, new_v, new_pos, new_score, new_rank = make_case(
        kind, B, K, S, C, D
    )
    gk, _, gpos, gscore, grank = numpy_evict_insert(
        k, v, pos, score, rank, new_k, new_v, new_pos, new_score, new_rank
    )
    spos, sscore, srank, dest = jax.jit(sorted_evict_slots)(
        pos, score, rank, new_pos, new_score, new_rank
    )
    sk = np.asarray(scatter_rows(k, dest, new_k))
    np.testing.assert_array_equal(np.sort(np.asarray(srank), 2), np.sort(grank, 2))
    for b in range(B):
        for h in range(K):

            def rows(p, sc, kk, b=b, h=h):
                return sorted(zip(p[b, h].tolist(), sc[b, h].tolist(), kk[b, h, :, 0].tolist()))

            assert rows(np.asarray(spos), np.asarray(sscore), sk) == rows(gpos, gscore, gk)


def test_keeps_top_ranked_candidates():
    """With distinct ranks and valid tokens, the cache ends with the S best of S + C."""
    B, K, S, C, D = 2, 2, 6, 10, 4
    args = make_case("random", B, K, S, C, D, seed=3)
    args[7][:] = np.abs(args[7])  # all new tokens valid
    args[4][:] = np.random.default_rng(4).standard_normal((B, K, S))  # no empty / protected
    _, _, _, _, rank = reference_evict_insert(*args)
    cand = np.concatenate([args[4], args[9]], axis=2)
    top = -np.sort(-cand, axis=2)[:, :, :S]
    np.testing.assert_array_equal(np.sort(np.asarray(rank), axis=2), np.sort(top, axis=2))


def test_bf16_cache_jit_donated():
    """New float32 keys are cast to a bfloat16 cache; the kernel runs under jit with donation."""
    args = list(make_case("random", 1, 2, 8, 3, 8, seed=5))
    args[0] = jnp.asarray(args[0], jnp.bfloat16)
    args[1] = jnp.asarray(args[1], jnp.bfloat16)
    want = numpy_evict_insert(*[np.asarray(a) for a in args])
    ref = reference_evict_insert(*args)
    _assert_equal(ref, want)
    fn = jax.jit(
        functools.partial(evict_insert, interpret=INTERPRET), donate_argnums=(0, 1, 2, 3, 4)
    )
    got = fn(*[jnp.asarray(a) for a in args])
    _assert_equal(got, want)
    assert got[0].dtype == jnp.bfloat16


def _bad(name):
    args = list(make_case("random", 1, 2, 6, 3, 4))
    if name == "pos_dtype":
        args[2] = args[2].astype(np.float32)
    elif name == "rank_dtype":
        args[4] = args[4].astype(np.float16)
    elif name == "score_shape":
        args[3] = args[3][:, :, :5]
    elif name == "v_shape":
        args[1] = args[1][:, :1]
    elif name == "new_k_shape":
        args[5] = args[5][..., :3]
    elif name == "new_v_shape":
        args[6] = args[6][:, :, :2]
    elif name == "new_pos_shape":
        args[7] = args[7][:, :, :2]
    elif name == "new_pos_dtype":
        args[7] = args[7].astype(np.float32)
    elif name == "k_rank":
        args[0] = args[0][0]
    return args


@pytest.mark.parametrize(
    "name,match",
    [
        ("pos_dtype", "pos_BKS must be int32"),
        ("rank_dtype", "rank_BKS must be float32"),
        ("score_shape", "score_BKS must have shape"),
        ("v_shape", "v_BKSD shape"),
        ("new_k_shape", "new_k_BKCD must have shape"),
        ("new_v_shape", "new_v_BKCD must have shape"),
        ("new_pos_shape", "new_pos_BKC must have shape"),
        ("new_pos_dtype", "new_pos_BKC must be an integer"),
        ("k_rank", "k_BKSD must be 4-D"),
    ],
)
@pytest.mark.parametrize("fn", [evict_insert, reference_evict_insert])
def test_bad_inputs_raise(name, match, fn):
    with pytest.raises(ValueError, match=match):
        fn(*_bad(name))

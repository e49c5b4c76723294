"""Tests for smartkv_jax.eviction: the greedy victim choice (`reference_evict_slots`) and the
one-sort chunk path (`sorted_evict_slots`) vs a literal numpy loop over the documented rule,
for decode (C = 1) and chunk (C > 1) inserts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smartkv_jax.eviction import reference_evict_slots, sorted_evict_slots

INF = np.float32(np.inf)


def numpy_evict_insert(k, v, pos, score, rank, new_k, new_v, new_pos, new_score, new_rank):
    """The documented semantics, literally: a Python loop over (b, kv) and new tokens, the
    k/v rows written where the token lands."""
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


def numpy_write_rows(x, dest, new):
    """x [B, K, S, D] with new[b, h, i] written at slot dest[b, h, i] (S: skipped), as the
    cache's row write does; the kept destinations of a row must be distinct."""
    x, dest = np.array(x), np.asarray(dest)
    B, K, S, _ = x.shape
    assert dest.dtype == np.int32 and ((dest >= 0) & (dest <= S)).all()
    for b in range(B):
        for h in range(K):
            kept = dest[b, h][dest[b, h] < S]
            assert len(set(kept.tolist())) == len(kept), "two new tokens kept in one slot"
            for i in np.flatnonzero(dest[b, h] < S):
                x[b, h, dest[b, h, i]] = np.asarray(new[b, h, i]).astype(x.dtype)
    return x


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
    elif kind == "room":  # the free slots take every new token (no eviction)
        pos[:, :, 1::2], rank[:, :, 1::2] = -1, -INF
        new_pos[:, :, 1] = -1  # padding
        new_rank[:, :, 2] = -INF  # a real token ranked -inf is not kept
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
    ("room", 2, 2, 12, 6, 4),
    ("all_dropped", 1, 2, 5, 4, 4),
    ("protected", 1, 2, 6, 5, 4),
    ("invalid_new", 2, 1, 4, 6, 4),
    ("ties", 1, 1, 5, 3, 4),
]


def _assert_equal(got, want, names=("k", "v", "pos", "score", "rank")):
    for name, a, b in zip(names, got, want, strict=True):
        assert np.asarray(a).dtype == np.asarray(b).dtype, name
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


def _assert_same_set(got_pos, got_score, got_k, want_pos, want_score, want_k):
    """Each (b, kv) row holds the same (pos, score, k row) triples, in any slot order."""
    B, K = want_pos.shape[:2]
    for b in range(B):
        for h in range(K):

            def rows(p, sc, kk, b=b, h=h):
                return sorted(zip(p[b, h].tolist(), sc[b, h].tolist(), kk[b, h, :, 0].tolist()))

            got = rows(np.asarray(got_pos), np.asarray(got_score), got_k)
            assert got == rows(want_pos, want_score, want_k)


@pytest.mark.parametrize("kind,B,K,S,C,D", CASES)
def test_reference_slots_match_numpy(kind, B, K, S, C, D):
    """The greedy path picks exactly the numpy loop's slots: same per-slot arrays, and the
    k/v rows written at dest give the numpy loop's k/v."""
    args = make_case(kind, B, K, S, C, D)
    k0, v0, pos0, score0, rank0, new_k, new_v, new_pos, new_score, new_rank = args
    want = numpy_evict_insert(*args)
    pos1, score1, rank1, dest = jax.jit(reference_evict_slots)(
        pos0, score0, rank0, new_pos, new_score, new_rank
    )
    k1 = numpy_write_rows(k0, dest, new_k)
    v1 = numpy_write_rows(v0, dest, new_v)
    _assert_equal((k1, v1, pos1, score1, rank1), want)
    assert dest.shape == (B, K, C)
    np.testing.assert_array_equal(np.asarray(dest)[new_pos < 0], S)  # padding never kept

    pos1, rank1 = np.asarray(pos1), np.asarray(rank1)
    if kind == "empty_cache":  # filled in order, lowest slot first
        np.testing.assert_array_equal(pos1[:, :, :C], new_pos)
        assert (pos1[:, :, C:] == -1).all()
    if kind == "some_empty":  # C == 1 goes to the first empty slot
        np.testing.assert_array_equal(pos1[:, :, 1], new_pos[:, :, 0])
        np.testing.assert_array_equal(k1[:, :, 1], new_k[:, :, 0])
    if kind == "all_dropped":
        np.testing.assert_array_equal(pos1, pos0)
        np.testing.assert_array_equal(np.asarray(dest), S)
    if kind == "protected":
        keep = np.isposinf(rank0)
        keep[:, :, S // 2] = False
        np.testing.assert_array_equal(pos1[keep], pos0[keep])
        np.testing.assert_array_equal(pos1[:, :, S // 2], new_pos[:, :, 0])  # +inf new stays
        np.testing.assert_array_equal(np.asarray(dest)[:, :, 1:], S)  # beaten by the +inf one
    if kind == "invalid_new":
        assert not (pos1 == -1).any() and not np.isposinf(rank1).any()
        assert np.isin(new_pos[:, :, 1::2], pos1).any()
    if kind == "ties":  # lowest rank first (last slot), then ties broken by lowest index
        np.testing.assert_array_equal(pos1[0, 0, [4, 0]], new_pos[0, 0, [0, 1]])
        np.testing.assert_array_equal(np.asarray(dest)[0, 0], [4, 0, S])
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
    assert spos.dtype == jnp.int32 and sscore.dtype == srank.dtype == jnp.float32
    sk = numpy_write_rows(k, dest, new_k)
    np.testing.assert_array_equal(np.sort(np.asarray(srank), 2), np.sort(grank, 2))
    _assert_same_set(spos, sscore, sk, gpos, gscore, gk)
    if kind in ("empty_cache", "room"):  # no sort: the greedy rule's own slots, in order
        greedy_dest = reference_evict_slots(pos, score, rank, new_pos, new_score, new_rank)[3]
        np.testing.assert_array_equal(np.asarray(dest), np.asarray(greedy_dest))


@pytest.mark.parametrize("fn", [reference_evict_slots, sorted_evict_slots])
def test_keeps_top_ranked_candidates(fn):
    """With distinct ranks and valid tokens, the cache ends with the S best of S + C."""
    B, K, S, C, D = 2, 2, 6, 10, 4
    _, _, pos, score, _, _, _, new_pos, new_score, new_rank = make_case(
        "random", B, K, S, C, D, seed=3
    )
    new_pos[:] = np.abs(new_pos)  # all new tokens valid
    rank = np.random.default_rng(4).standard_normal((B, K, S)).astype(np.float32)
    _, _, rank1, _ = fn(pos, score, rank, new_pos, new_score, new_rank)
    cand = np.concatenate([rank, new_rank], axis=2)
    top = -np.sort(-cand, axis=2)[:, :, :S]
    np.testing.assert_array_equal(np.sort(np.asarray(rank1), axis=2), np.sort(top, axis=2))


def test_new_scores_and_ranks_are_cast():
    """bfloat16 new scores / ranks are kept as float32, as the numpy loop on their values."""
    k, v, pos, score, rank, new_k, new_v, new_pos, new_score, new_rank = make_case(
        "random", 2, 2, 8, 5, 4, seed=5
    )
    new_score = jnp.asarray(new_score, jnp.bfloat16)
    new_rank = jnp.asarray(new_rank, jnp.bfloat16)
    as_f32 = [np.asarray(x, np.float32) for x in (new_score, new_rank)]
    gk, _, gpos, gscore, grank = numpy_evict_insert(
        k, v, pos, score, rank, new_k, new_v, new_pos, *as_f32
    )
    pos1, score1, rank1, dest = jax.jit(reference_evict_slots)(
        pos, score, rank, new_pos, new_score, new_rank
    )
    _assert_equal((pos1, score1, rank1), (gpos, gscore, grank), ("pos", "score", "rank"))
    spos, sscore, srank, sdest = jax.jit(sorted_evict_slots)(
        pos, score, rank, new_pos, new_score, new_rank
    )
    assert sscore.dtype == srank.dtype == jnp.float32 and sdest.dtype == jnp.int32
    _assert_same_set(spos, sscore, numpy_write_rows(k, sdest, new_k), gpos, gscore, gk)

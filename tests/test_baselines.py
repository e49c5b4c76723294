"""The newer baselines' scoring and budget rules against small numpy references: KeyDiff,
Expected Attention, Ada-KV's head-adaptive keep, PyramidKV's budgets and SnapKV's oneshot
scores."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from smartkv_jax.attention import AttentionRule
from smartkv_jax.cache import LayerCache
from smartkv_jax.context_scores import (
    ContextView,
    expected_attention_scores,
    head_adaptive_keep,
    keydiff_scores,
    per_head_keep,
)
from smartkv_jax.policy import SnapKVPolicy
from smartkv_jax.policy_table import pyramid_capacities

B, K, G, S, D = 2, 2, 3, 20, 8
RNG = np.random.default_rng(0)


def _view(live_from: int = 0) -> ContextView:
    k = RNG.normal(size=(B, K, S, D)).astype(np.float32)
    v = RNG.normal(size=(B, K, S, D)).astype(np.float32)
    pos = np.broadcast_to(np.arange(S), (B, K, S)).copy()
    pos[..., :live_from] = -1
    a = RNG.normal(size=(B, K * G, D, D)) / 3
    cov = (a @ a.transpose(0, 1, 3, 2)).astype(np.float32)
    return ContextView(
        cache=LayerCache(jnp.asarray(k), jnp.asarray(v), jnp.asarray(pos), jnp.zeros((B, K, S))),
        k_pre_BKSD=jnp.asarray(k),
        obs_mass_BKWS=jnp.asarray(RNG.random((B, K, 6, S)).astype(np.float32)),
        q_mean_BHD=jnp.asarray(RNG.normal(size=(B, K * G, D)).astype(np.float32)),
        q_cov_BHDD=jnp.asarray(cov),
        inv_freq=jnp.asarray(1.0 / 100 ** (np.arange(0, D, 2) / D), jnp.float32),
        t_B=jnp.asarray([S - 1, S + 30], jnp.int32),
        rule=AttentionRule(0.4),
    )


def test_keydiff_scores_match_numpy():
    view = _view(live_from=3)
    k, live = np.asarray(view.cache.k), np.asarray(view.cache.pos) >= 0
    unit = k / np.linalg.norm(k, axis=-1, keepdims=True)
    want = np.zeros((B, K, S))
    for b in range(B):
        for h in range(K):
            anchor = unit[b, h, live[b, h]].mean(0)
            want[b, h] = -(unit[b, h] @ anchor) / np.linalg.norm(anchor)
    got = keydiff_scores(view.cache.k, view.live_BKS)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def _rotation(angles: np.ndarray) -> np.ndarray:
    """The rotate-half RoPE matrix [D, D] for per-pair angles [D/2]: pair (i, i + D/2)."""
    h = len(angles)
    r = np.zeros((2 * h, 2 * h))
    for i, a in enumerate(angles):
        r[i, i], r[i, i + h] = np.cos(a), -np.sin(a)
        r[i + h, i], r[i + h, i + h] = np.sin(a), np.cos(a)
    return r


def test_expected_attention_matches_numpy():
    view, n_future = _view(live_from=2), 16
    k, v = np.asarray(view.cache.k, np.float64), np.asarray(view.cache.v, np.float64)
    live = np.asarray(view.cache.pos) >= 0
    inv, s = np.asarray(view.inv_freq, np.float64), view.rule.scale
    want = np.zeros((B, K, S))
    for b in range(B):
        t = int(view.t_B[b])
        r = np.mean([_rotation((t + j) * inv) for j in range(1, n_future + 1)], axis=0)
        for h in range(K):
            probs = []
            for g in range(G):
                q = h * G + g
                mu = r @ np.asarray(view.q_mean_BHD[b, q], np.float64)
                cov = r @ np.asarray(view.q_cov_BHDD[b, q], np.float64) @ r.T
                logit = s * k[b, h] @ mu + 0.5 * s * s * np.einsum(
                    "sd,de,se->s", k[b, h], cov, k[b, h]
                )
                logit = np.where(live[b, h], logit, -np.inf)
                e = np.exp(logit - logit.max())
                probs.append(e / e.sum())
            want[b, h] = np.mean(probs, axis=0) * np.linalg.norm(v[b, h], axis=-1)
    got = expected_attention_scores(view, n_future)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=1e-7)


def _adakv_reference(rank: np.ndarray, capacity: int, alpha: float) -> np.ndarray:
    """Ada-KV's rule row by row: floor(alpha * capacity) best per head, then the best of
    the rest over all heads until K * capacity are kept."""
    keep = np.zeros(rank.shape, bool)
    for b in range(rank.shape[0]):
        for h in range(rank.shape[1]):
            keep[b, h, np.argsort(-rank[b, h], kind="stable")[: int(alpha * capacity)]] = True
        rest = np.where(keep[b], -np.inf, rank[b]).ravel()
        extra = rank.shape[1] * capacity - keep[b].sum()
        flat = keep[b].ravel()
        flat[np.argsort(-rest, kind="stable")[:extra]] = True
        keep[b] = flat.reshape(keep[b].shape)
    return keep


@pytest.mark.parametrize("alpha", [0.0, 0.2, 1.0])
def test_head_adaptive_keep_matches_numpy(alpha):
    rank = RNG.normal(size=(B, 3, 30)).astype(np.float32)
    rank[0, 1] += 3.0  # one head far more important: it takes most of the layer's budget
    got = np.asarray(head_adaptive_keep(jnp.asarray(rank), jnp.int32(10), alpha))
    want = _adakv_reference(rank, 10, alpha)
    np.testing.assert_array_equal(got, want)
    assert (got.sum(axis=(1, 2)) == 30).all()
    assert got[0, 1].sum() > 10 if alpha < 1 else got[0, 1].sum() == 10
    if alpha == 1.0:
        np.testing.assert_array_equal(got, np.asarray(per_head_keep(jnp.asarray(rank), 10)))


def test_per_head_keep_breaks_ties_by_the_lower_slot():
    rank = RNG.integers(0, 4, size=(B, 3, 40)).astype(np.float32)  # many ties
    got = np.asarray(per_head_keep(jnp.asarray(rank), jnp.int32(7)))
    want = np.zeros(rank.shape, bool)
    for b in range(B):
        for h in range(3):
            want[b, h, np.argsort(-rank[b, h], kind="stable")[:7]] = True
    np.testing.assert_array_equal(got, want)


def test_keep_never_takes_empty_slots():
    rank = np.full((1, 2, 8), -np.inf, np.float32)
    rank[0, 0, :3] = [1.0, 2.0, 3.0]
    assert np.asarray(per_head_keep(jnp.asarray(rank), 5)).sum() == 3
    assert np.asarray(head_adaptive_keep(jnp.asarray(rank), 5, 0.2)).sum() == 3


def test_pyramid_budgets():
    caps = pyramid_capacities(30, 4096, 0.25)
    assert caps == sorted(caps, reverse=True) and abs(np.mean(caps) - 1024) < 1
    assert caps[-1] == round(1024 / 20) and caps[0] == round(2 * 1024 - 1024 / 20)
    big = pyramid_capacities(30, 4096, 0.75)  # the first layer capped at context - window
    assert big[0] == 4096 - 32 and abs(np.mean(big) - 3072) < 1
    assert pyramid_capacities(30, 4096, 0.125) == [512] * 30  # share/beta < window: uniform


def test_snapkv_oneshot_scores_pool_the_last_queries():
    view = _view()
    pol = SnapKVPolicy(capacity=8, obs_window=4, pool=3)
    mass = np.asarray(view.obs_mass_BKWS)[:, :, -4:].sum(2)
    padded = np.pad(mass, ((0, 0), (0, 0), (1, 1)), constant_values=-np.inf)
    want = np.max(np.stack([padded[..., i : i + S] for i in range(3)]), axis=0)
    np.testing.assert_allclose(np.asarray(pol.context_scores(view)), want, rtol=1e-6)

"""The chunk attention over the cache: the block-by-block path (`blocked_attention`, which
skips blocks no query can see) equals the one-pass reference, and `attend` takes it; the
attention mass attention-scored policies rank by, block by block, equals a dense numpy one."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.decode_attention import reference_decode_attention
from smartkv_jax.attention import (
    CACHE_BLOCK,
    AttentionRule,
    attend,
    attention_mass,
    blocked_attention,
)
from smartkv_jax.cache import LayerCache


def _cache(rng, b, k, s, d, filled, shuffle=True):
    """A cache whose first `filled` slots hold positions 0.. (one hole; with `shuffle`, row 1's
    slots permuted, so its occupied slots spread over every block); the rest empty."""
    pos = np.full((b, k, s), -1, np.int32)
    pos[:, :, :filled] = np.arange(filled)
    if shuffle:
        pos[1] = rng.permutation(pos[1].T).T
    pos[0, 0, 3] = -1
    kv = rng.normal(size=(2, b, k, s, d)).astype(np.float32)
    return LayerCache(
        jnp.asarray(kv[0]), jnp.asarray(kv[1]), jnp.asarray(pos), jnp.zeros(pos.shape)
    )


@pytest.mark.parametrize("window", [0, 300])
@pytest.mark.parametrize("tail", [0, 40])
def test_blocked_attention_equals_the_reference(window, tail):
    """Whole blocks and, with `tail`, a last partial block, which row 1's shuffled slots
    reach."""
    rng = np.random.default_rng(0)
    b, h, k, s, d, c = 2, 4, 2, 3 * CACHE_BLOCK + tail, 16, 8
    cache = _cache(rng, b, k, s, d, filled=CACHE_BLOCK + 40)
    q = jnp.asarray(rng.normal(size=(b, h, c, d)).astype(np.float32))
    pos = np.tile(np.arange(CACHE_BLOCK + 40, CACHE_BLOCK + 40 + c), (b, 1)).astype(np.int32)
    pos[1, -2:] = -1  # padding queries
    rule = AttentionRule(scale=d**-0.5, window=window)
    out, lse = jax.jit(blocked_attention, static_argnums=4)(
        cache, cache.pos, q, jnp.asarray(pos), rule
    )
    ref_out, ref_lse = reference_decode_attention(
        q, cache.k, cache.v, cache.pos, jnp.asarray(pos), scale=rule.scale, window=window
    )
    np.testing.assert_allclose(out, ref_out, atol=1e-5)
    np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(ref_lse))
    np.testing.assert_allclose(
        np.where(np.isfinite(lse), lse, 0), np.where(np.isfinite(ref_lse), ref_lse, 0), atol=1e-5
    )
    assert not np.isfinite(np.asarray(lse)[1, :, -2:]).any()  # padding sees nothing


def test_attend_gives_the_same_result_by_either_path():
    """A chunk over a cache of more than one block goes block by block (whole blocks, or
    whole blocks and a partial one), a smaller cache in one pass; all equal the reference
    merge."""
    rng = np.random.default_rng(1)
    b, h, k, d, c = 2, 4, 2, 16, 8
    rule = AttentionRule(scale=d**-0.5)
    q = jnp.asarray(rng.normal(size=(b, h, c, d)).astype(np.float32))
    kv_new = jnp.asarray(rng.normal(size=(2, b, k, c, d)).astype(np.float32))
    for s in (2 * CACHE_BLOCK, 2 * CACHE_BLOCK + 8, CACHE_BLOCK - 8):
        cache = _cache(rng, b, k, s, d, filled=200, shuffle=False)
        pos = jnp.asarray(np.tile(np.arange(200, 200 + c), (b, 1)).astype(np.int32))
        out, lse = attend(cache, cache.pos, q, kv_new[0], kv_new[1], pos, rule)
        # the same attention over the cache with the chunk written into its empty slots
        kk = cache.k.at[:, :, 200 : 200 + c].set(kv_new[0])
        vv = cache.v.at[:, :, 200 : 200 + c].set(kv_new[1])
        pp = cache.pos.at[:, :, 200 : 200 + c].set(pos[:, None, :])
        ref_out, ref_lse = reference_decode_attention(q, kk, vv, pp, pos, scale=rule.scale)
        np.testing.assert_allclose(out, ref_out, atol=1e-5)
        np.testing.assert_allclose(lse, ref_lse, atol=1e-5)


def _dense_mass(q, k_cache, pos_cache, k_new, pos, weight, scale, window):
    """numpy reference: softmax over cache slots and the chunk's own keys per query head,
    summed over each KV group's heads and the weighted queries: ([B, K, S], [B, K, C])."""
    b, h, c, _ = q.shape
    kh = k_cache.shape[1]
    mass_s = np.zeros(pos_cache.shape)
    mass_c = np.zeros((b, kh, c))
    for r, head, i in np.ndindex(b, h, c):
        t, g = pos[r, i], head // (h // kh)
        if t < 0:
            continue
        keys = np.concatenate([k_cache[r, g], k_new[r, g]])
        kpos = np.concatenate([pos_cache[r, g], pos[r]])
        ok = (kpos >= 0) & (kpos <= t) & ((kpos > t - window) if window else True)
        logit = np.where(ok, keys @ q[r, head, i] * scale, -np.inf)
        p = np.exp(logit - logit.max())
        p = p / p.sum() * weight[r, i]
        mass_s[r, g] += p[: pos_cache.shape[2]]
        mass_c[r, g] += p[pos_cache.shape[2] :]
    return mass_s, mass_c


@pytest.mark.parametrize("window", [0, 300])
@pytest.mark.parametrize("capacity", [3 * CACHE_BLOCK, 3 * CACHE_BLOCK + 40, CACHE_BLOCK - 8])
def test_attention_mass_block_by_block_equals_numpy(window, capacity):
    """Whole blocks (one of them empty, so skipped), a partial tail, and a one-pass cache;
    weighted queries and padding."""
    rng = np.random.default_rng(2)
    b, h, k, d, c = 2, 4, 2, 16, 8
    filled = min(capacity, CACHE_BLOCK + 40)
    cache = _cache(rng, b, k, capacity, d, filled=filled)
    q = rng.normal(size=(b, h, c, d)).astype(np.float32)
    k_new = rng.normal(size=(b, k, c, d)).astype(np.float32)
    pos = np.tile(np.arange(filled, filled + c), (b, 1)).astype(np.int32)
    pos[1, -2:] = -1
    weight = rng.uniform(size=(b, c)).astype(np.float32)
    rule = AttentionRule(scale=d**-0.5, window=window)
    # the queries' log-sum-exps over every key they see, as `attend` returns them
    _, lse = attend(cache, cache.pos, jnp.asarray(q), jnp.asarray(k_new), jnp.asarray(k_new),
                    jnp.asarray(pos), rule)  # fmt: skip
    args = (jnp.asarray(q), jnp.asarray(k_new), jnp.asarray(pos), lse, jnp.asarray(weight))
    mass_s, mass_c = jax.jit(attention_mass, static_argnums=7)(cache, cache.pos, *args, rule)
    ref_s, ref_c = _dense_mass(
        q, np.asarray(cache.k), np.asarray(cache.pos), k_new, pos, weight, rule.scale, window
    )
    np.testing.assert_allclose(mass_s, ref_s, atol=1e-5)
    np.testing.assert_allclose(mass_c, ref_c, atol=1e-5)
    assert np.sum(ref_s) > 1.0  # the cache received real mass

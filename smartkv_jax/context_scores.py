"""What a policy may read when a whole context is compressed at once (the `oneshot`
protocol: the context is prefilled with the full cache, then compressed to the budget before
the question is read), and the scoring rules of the baselines defined for it.

Shapes (letters in names): B batch, K KV heads, H query heads (G = H / K per KV head),
S cache slots, W observation-window queries (the context's last tokens), D head dim.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from .attention import AttentionRule
from .cache import LayerCache
from .eviction import places
from .rope import rotate


@partial(
    jax.tree_util.register_dataclass,
    data_fields=[
        "cache",
        "k_pre_BKSD",
        "obs_mass_BKWS",
        "q_mean_BHD",
        "q_cov_BHDD",
        "inv_freq",
        "t_B",
        "aux",
    ],
    meta_fields=["rule"],
)
@dataclasses.dataclass(frozen=True)
class ContextView:
    """One layer after its context was prefilled into a cache large enough for all of it
    (slot s holds position s, or is empty: pos -1).

    cache: k (after RoPE), v, pos and score (the attention every context query paid each
    slot, summed over the KV group's heads: H2O's score). k_pre_BKSD: the keys before RoPE.
    obs_mass_BKWS: attention of each of the last W context queries to every slot, summed
    over the group's heads. q_mean_BHD, q_cov_BHDD: mean and covariance of the context's
    queries before RoPE (the first sink positions left out). inv_freq: the layer's RoPE
    frequencies [D/2]. t_B: the last context position. aux: the layer's side input.
    """

    cache: LayerCache
    k_pre_BKSD: jax.Array
    obs_mass_BKWS: jax.Array
    q_mean_BHD: jax.Array
    q_cov_BHDD: jax.Array
    inv_freq: jax.Array
    t_B: jax.Array
    rule: AttentionRule
    aux: Any = None

    @property
    def live_BKS(self) -> jax.Array:
        return self.cache.pos >= 0


def max_pool_slots(x_BKS: jax.Array, pool: int) -> jax.Array:
    """Max over `pool` neighbouring slots (positions, in a context cache), centred."""
    pad = pool // 2
    padded = jnp.pad(x_BKS, ((0, 0), (0, 0), (pad, pad)), constant_values=-jnp.inf)
    return jax.lax.reduce_window(padded, -jnp.inf, jax.lax.max, (1, 1, pool), (1, 1, 1), "VALID")


def keydiff_scores(k_BKSD: jax.Array, live_BKS: jax.Array) -> jax.Array:
    """KeyDiff: minus the cosine similarity of each key to its head's anchor, the mean of
    the live keys' unit vectors, so the most distinctive keys score highest. [B, K, S]"""
    k = k_BKSD.astype(jnp.float32)
    unit = k / jnp.maximum(jnp.linalg.norm(k, axis=-1, keepdims=True), 1e-6)
    w = live_BKS.astype(jnp.float32)[..., None]
    anchor = jnp.sum(unit * w, axis=2) / jnp.maximum(jnp.sum(w, axis=2), 1.0)  # [B, K, D]
    anchor = anchor / jnp.maximum(jnp.linalg.norm(anchor, axis=-1, keepdims=True), 1e-6)
    return -jnp.einsum("bksd,bkd->bks", unit, anchor)


def query_statistics(q_BHND: jax.Array, valid_BN: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean [B, H, D] and covariance [B, H, D, D] of the valid queries of each head."""
    q = q_BHND.astype(jnp.float32)
    w = valid_BN.astype(jnp.float32)[:, None, :, None]
    n = jnp.maximum(jnp.sum(w, axis=2), 1.0)  # [B, 1, 1]
    mu = jnp.sum(q * w, axis=2) / n
    x = (q - mu[:, :, None]) * w
    return mu, jnp.einsum("bhnd,bhne->bhde", x, x) / n[..., None]


def mean_future_rotation(inv_freq: jax.Array, t_B: jax.Array, n_future: int):
    """Cosines and sines [B, D/2] of RoPE's rotation averaged over positions t+1 .. t+n."""
    steps = jnp.arange(1, n_future + 1, dtype=jnp.float32)
    ang = (t_B.astype(jnp.float32)[:, None, None] + steps[None, :, None]) * inv_freq
    return jnp.mean(jnp.cos(ang), axis=1), jnp.mean(jnp.sin(ang), axis=1)


def expected_attention(
    k_BKSD: jax.Array,
    v_BKSD: jax.Array,
    live_BKS: jax.Array,
    mu_BHD: jax.Array,
    cov_BHDD: jax.Array,
    scale: float,
) -> jax.Array:
    """Expected Attention with queries ~ N(mu, cov) (in the keys' rotated frame): a key's
    expected logit is s k.mu + s^2/2 k' cov k (s: the logit scale), softmaxed over the live
    slots, averaged over the KV group's heads, times the value's norm. [B, K, S]"""
    k = k_BKSD.astype(jnp.float32)
    b, kh, _, d = k.shape
    g = mu_BHD.shape[1] // kh
    mu, cov = mu_BHD.reshape(b, kh, g, d), cov_BHDD.reshape(b, kh, g, d, d)
    logit = scale * jnp.einsum("bkgd,bksd->bkgs", mu, k)
    logit += 0.5 * scale * scale * jnp.einsum("bksd,bkgde,bkse->bkgs", k, cov, k)
    logit = jnp.where(live_BKS[:, :, None], logit, -jnp.inf)
    probs = jnp.mean(jax.nn.softmax(logit, axis=-1), axis=2)
    return probs * jnp.linalg.norm(v_BKSD.astype(jnp.float32), axis=-1)


def expected_attention_scores(view: ContextView, n_future: int = 512) -> jax.Array:
    """`expected_attention` for the next `n_future` positions after a context: the context
    queries' mean and covariance before RoPE, turned by RoPE's rotation R averaged over those
    positions (R mu, R cov R'). [B, K, S]"""
    b, _, d = view.q_mean_BHD.shape
    cos, sin = mean_future_rotation(view.inv_freq, view.t_B, n_future)  # [B, D/2]
    mu = rotate(view.q_mean_BHD, cos[:, None], sin[:, None])
    eye = jnp.broadcast_to(jnp.eye(d), (b, d, d))
    r_BDD = rotate(eye, cos[:, None], sin[:, None]).transpose(0, 2, 1)  # column j: R e_j
    cov = jnp.einsum("bij,bhjk,blk->bhil", r_BDD, view.q_cov_BHDD, r_BDD)
    c = view.cache
    return expected_attention(c.k, c.v, view.live_BKS, mu, cov, view.rule.scale)


def head_adaptive_keep(rank_BKS: jax.Array, capacity: jax.Array, alpha: float) -> jax.Array:
    """Ada-KV's budget rule: the layer keeps K * capacity slots in all, each head at least
    floor(alpha * capacity) of its best, the rest the best of all heads pooled. Slots
    ranked -inf are never kept. capacity may be traced. Returns keep [B, K, S] bool."""
    b, kh, s = rank_BKS.shape
    safe = jnp.floor(alpha * capacity)
    guaranteed = (places(rank_BKS) < safe) & jnp.isfinite(rank_BKS)
    boosted = jnp.where(guaranteed, jnp.inf, rank_BKS).reshape(b, 1, kh * s)
    keep = (places(boosted) < kh * capacity).reshape(b, kh, s)
    return keep & (rank_BKS > -jnp.inf)


def per_head_keep(rank_BKS: jax.Array, capacity: jax.Array) -> jax.Array:
    """The `capacity` best-ranked slots of each head (never one ranked -inf; capacity may be
    traced). [B, K, S]"""
    return (places(rank_BKS) < capacity) & (rank_BKS > -jnp.inf)

"""Attention of a chunk of new queries over a layer's cache plus the chunk itself, and the
attention mass attention-scored policies rank by (docs/design.md: the cache, kernels)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.decode_attention import decode_attention, reference_decode_attention

from .cache import LayerCache


def attend(
    cache: LayerCache,
    visible_pos_BKS: jax.Array,
    q_BHCD: jax.Array,
    k_BKCD: jax.Array,
    v_BKCD: jax.Array,
    pos_BC: jax.Array,
    kernels: str = "reference",
) -> tuple[jax.Array, jax.Array]:
    """Attention of a chunk of C new queries over the cache plus the chunk's own keys.

    The cache part and the causal chunk part are computed separately and merged by their
    log-sum-exps, so the chunk never has to be copied into the cache first.
    kernels: "pallas" (the TPU decode-attention kernel), "interpret" (that kernel in Pallas
    interpret mode) or "reference" (plain jnp).
    Returns (out_BHCD float32, lse_BHC float32); lse is -inf for padding queries.
    """
    b, h, c, d = q_BHCD.shape
    kh = k_BKCD.shape[1]
    g = h // kh
    scale = d**-0.5
    args = (q_BHCD, cache.k, cache.v, visible_pos_BKS, pos_BC)
    if kernels == "reference":
        out_c, lse_c = reference_decode_attention(*args, scale=scale)
    else:
        out_c, lse_c = decode_attention(*args, scale=scale, interpret=kernels == "interpret")
    qg = q_BHCD.reshape(b, kh, g, c, d).astype(jnp.float32)
    logits = jnp.einsum("bkgqd,bkcd->bkgqc", qg, k_BKCD.astype(jnp.float32)) * scale
    ok = (pos_BC[:, None, :] >= 0) & (pos_BC[:, None, :] <= pos_BC[:, :, None])  # [B, Cq, Ck]
    logits = jnp.where(ok[:, None, None], logits, -jnp.inf)
    lse_n = jax.nn.logsumexp(logits, axis=-1)  # [B, K, G, Cq]
    safe_n = jnp.where(jnp.isfinite(lse_n), lse_n, 0.0)
    p_n = jnp.exp(logits - safe_n[..., None])
    out_n = jnp.einsum("bkgqc,bkcd->bkgqd", p_n, v_BKCD.astype(jnp.float32))
    lse_n = lse_n.reshape(b, h, c)
    out_n = out_n.reshape(b, h, c, d)
    lse = jnp.logaddexp(lse_c, lse_n)
    safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    w_c = jnp.where(jnp.isfinite(lse_c), jnp.exp(lse_c - safe), 0.0)[..., None]
    w_n = jnp.where(jnp.isfinite(lse_n), jnp.exp(lse_n - safe), 0.0)[..., None]
    return w_c * out_c + w_n * out_n, lse


def attention_mass(
    cache: LayerCache,
    visible_pos_BKS: jax.Array,
    q_BHCD: jax.Array,
    k_BKCD: jax.Array,
    pos_BC: jax.Array,
    lse_BHC: jax.Array,
    weight_BC: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Attention probability paid to each cache slot and each new token, summed over the
    query heads of each KV group and over the chunk's queries weighted by weight_BC.

    Returns (mass_BKS, mass_BKC) float32, for attention-scored policies (H2O, TOVA, SnapKV).
    """
    b, h, c, d = q_BHCD.shape
    kh = k_BKCD.shape[1]
    scale = d**-0.5
    qg = q_BHCD.reshape(b, kh, h // kh, c, d).astype(jnp.float32)
    lse = jnp.where(jnp.isfinite(lse_BHC), lse_BHC, jnp.inf).reshape(b, kh, h // kh, c, 1)
    w = weight_BC.astype(jnp.float32)[:, None, None, :, None]
    s_c = jnp.einsum("bkgqd,bksd->bkgqs", qg, cache.k.astype(jnp.float32)) * scale
    ok_c = (visible_pos_BKS[:, :, None, None, :] >= 0) & (
        visible_pos_BKS[:, :, None, None, :] <= pos_BC[:, None, None, :, None]
    )
    mass_c = jnp.sum(jnp.where(ok_c, jnp.exp(s_c - lse), 0.0) * w, axis=(2, 3))
    s_n = jnp.einsum("bkgqd,bkcd->bkgqc", qg, k_BKCD.astype(jnp.float32)) * scale
    ok_n = (pos_BC[:, None, :] >= 0) & (pos_BC[:, None, :] <= pos_BC[:, :, None])
    mass_n = jnp.sum(jnp.where(ok_n[:, None, None], jnp.exp(s_n - lse), 0.0) * w, axis=(2, 3))
    return mass_c, mass_n

"""The rotate-half RoPE rotation (the transformers convention) by given angles' cosines and
sines, shared by the model (rotating by positions) and context scoring (undoing a rotation,
averaging one over future positions)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rotate(x_ND: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x rotated pairwise (i, i + D/2) by angles with cosines `cos` and sines `sin` [..., D/2]
    (broadcast against x's leading axes), in float32."""
    xf = x_ND.astype(jnp.float32)
    half = xf.shape[-1] // 2
    c, s = jnp.concatenate([cos, cos], -1), jnp.concatenate([sin, sin], -1)
    rot = jnp.concatenate([-xf[..., half:], xf[..., :half]], -1)
    return xf * c + rot * s

"""Llama / Mistral / Qwen2 decoder as pure functions over a params pytree.

params = {
  "embed":      [V, E],
  "final_norm": [E],
  "lm_head":    [E, V]          (absent when the embeddings are tied),
  "layers": {                    every leaf stacked on a leading layer axis L
    "attn_norm": [L, E],  "wq": [L, E, H*D],  "wk": [L, E, K*D],  "wv": [L, E, K*D],
    "bq": [L, H*D], "bk": [L, K*D], "bv": [L, K*D]   (Qwen2 / attention_bias only),
    "wo": [L, H*D, E],  "mlp_norm": [L, E],
    "w_gate": [L, E, F],  "w_up": [L, E, F],  "w_down": [L, F, E],
  },
}
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from . import cache as kvcache
from . import gates as gate_mod
from . import policy as pol
from .cache import KVCache, LayerCache
from .config import ModelConfig, RopeScaling

Params = dict
Probe = Callable[[jax.Array, jax.Array, jax.Array], Any]


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling) -> jax.Array:
    """Inverse frequencies [D/2] (radians per position), with the llama3 rule if asked."""
    inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling.kind != "llama3":
        return inv
    wavelen = 2 * math.pi / inv
    low_wavelen = scaling.original_max_position / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position / scaling.high_freq_factor
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    smooth = (scaling.original_max_position / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    mixed = (1 - smooth) * inv / scaling.factor + smooth * inv
    out = jnp.where(wavelen > low_wavelen, inv / scaling.factor, inv)
    return jnp.where((wavelen >= high_wavelen) & (wavelen <= low_wavelen), mixed, out)


def apply_rope(x_BNCD: jax.Array, pos_BC: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate-half RoPE (the transformers convention) at per-token positions."""
    ang = jnp.maximum(pos_BC, 0).astype(jnp.float32)[..., None] * inv_freq  # [B, C, D/2]
    cos = jnp.cos(jnp.concatenate([ang, ang], -1))[:, None]
    sin = jnp.sin(jnp.concatenate([ang, ang], -1))[:, None]
    xf = x_BNCD.astype(jnp.float32)
    half = xf.shape[-1] // 2
    rot = jnp.concatenate([-xf[..., half:], xf[..., :half]], -1)
    return (xf * cos + rot * sin).astype(x_BNCD.dtype)


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + eps)
    return (y * w.astype(jnp.float32)).astype(x.dtype)


def _qkv(lp: dict, h_BCE: jax.Array, cfg: ModelConfig):
    b, c, _ = h_BCE.shape
    q = h_BCE @ lp["wq"]
    k = h_BCE @ lp["wk"]
    v = h_BCE @ lp["wv"]
    if cfg.qkv_bias:
        q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
    d = cfg.head_dim
    q = q.reshape(b, c, cfg.num_heads, d).transpose(0, 2, 1, 3)  # [B, H, C, D]
    k = k.reshape(b, c, cfg.num_kv_heads, d).transpose(0, 2, 1, 3)  # [B, K, C, D]
    v = v.reshape(b, c, cfg.num_kv_heads, d).transpose(0, 2, 1, 3)
    return q, k, v


def _mlp(lp: dict, x_BCE: jax.Array, cfg: ModelConfig) -> jax.Array:
    h = rms_norm(x_BCE, lp["mlp_norm"], cfg.rms_norm_eps)
    return (jax.nn.silu(h @ lp["w_gate"]) * (h @ lp["w_up"])) @ lp["w_down"]


def _layer(
    lp: dict,
    lc: LayerCache,
    x_BCE: jax.Array,
    pos_BC: jax.Array,
    extra: dict,
    cfg: ModelConfig,
    policy: pol.LayerPolicy,
    inv_freq: jax.Array,
    probe: Probe | None,
) -> tuple[jax.Array, tuple, Any]:
    """One decoder layer over a chunk, reading its cache `lc` under `policy`.

    Returns the new hidden states, the cache update (pos_BKS, score_BKS, dest_BKC, k_BKCD,
    v_BKCD: new keys go to slots dest; see cache.write_rows) and the probe's output.

    extra: this layer's slice of {"gates": gate params [K, ...]} (gated) or
    {"oracle": true log4 lifespans [B, K, C]} (oracle).
    """
    b, c, _ = x_BCE.shape
    h = rms_norm(x_BCE, lp["attn_norm"], cfg.rms_norm_eps)
    q, k_pre, v = _qkv(lp, h, cfg)
    q = apply_rope(q, pos_BC, inv_freq)
    k = apply_rope(k_pre, pos_BC, inv_freq)
    t_B = jnp.max(pos_BC, axis=1)  # newest position of each row after this chunk
    visible = pol.visible_pos(policy, lc.pos, lc.score, t_B)
    out, lse = kvcache.attend(lc, visible, q, k, v, pos_BC)
    out = out.astype(x_BCE.dtype).transpose(0, 2, 1, 3).reshape(b, c, -1)
    x = x_BCE + out @ lp["wo"]
    x = x + _mlp(lp, x, cfg)

    given, score = None, lc.score
    if policy.kind == "gated":
        given = gate_mod.apply_layer(extra["gates"], k_pre, pos_BC)
    elif policy.kind == "oracle":
        given = extra["oracle"]
    elif policy.kind in pol.ATTENTION_SCORED:
        weight = _observed_queries(policy, pos_BC, t_B)
        mass_c, given = kvcache.attention_mass(lc, visible, q, k, pos_BC, lse, weight)
        if policy.kind == "snapkv":  # pool along the chunk's (contiguous) positions
            given = _max_pool(given, policy.pool)
        score = pol.update_scores(policy, lc.score, mass_c)
    new_score = pol.new_scores(policy, pos_BC, k_pre, given)
    rank = pol.ranks(policy, lc.pos, score, t_B)
    new_pos = jnp.broadcast_to(pos_BC[:, None, :], new_score.shape)
    new_rank = pol.ranks(policy, new_pos, new_score, t_B)
    pos, score, dest = kvcache.choose_slots(lc, score, rank, pos_BC, new_score, new_rank)
    return x, (pos, score, dest, k, v), None if probe is None else probe(q, k, k_pre)


def _observed_queries(policy: pol.LayerPolicy, pos_BC: jax.Array, t_B: jax.Array) -> jax.Array:
    """Which of the chunk's queries feed attention scores: all (h2o), the newest (tova) or
    the last obs_window (snapkv). [B, C] float."""
    valid = pos_BC >= 0
    if policy.kind == "tova":
        valid &= pos_BC == t_B[:, None]
    elif policy.kind == "snapkv":
        valid &= pos_BC > t_B[:, None] - policy.obs_window
    return valid.astype(jnp.float32)


def _max_pool(x_BKC: jax.Array, width: int) -> jax.Array:
    pad = width // 2
    padded = jnp.pad(x_BKC, ((0, 0), (0, 0), (pad, pad)), constant_values=-jnp.inf)
    return jax.lax.reduce_window(padded, -jnp.inf, jax.lax.max, (1, 1, width), (1, 1, 1), "VALID")


def forward(
    params: Params,
    cfg: ModelConfig,
    policy: pol.PolicyConfig,
    tokens_BC: jax.Array,
    pos_BC: jax.Array,
    cache: KVCache,
    *,
    gates: Any = None,
    oracle_LBKC: jax.Array | None = None,
    probe: Probe | None = None,
) -> tuple[jax.Array, KVCache] | tuple[jax.Array, KVCache, Any]:
    """Run a chunk of C tokens (positions pos_BC, -1 = padding) through every layer.

    Reads and updates `cache` (it goes in and comes out). Returns the final-normed hidden
    states [B, C, E]; turn them into logits with `logits`. `gates` (leaves [L, K, ...]) are
    needed by gated layers, `oracle_LBKC` (true log4 lifespans of the chunk's keys) by
    oracle layers. With `probe`, a function of one layer's (q_BHCD after RoPE, k_BKCD after
    RoPE, k_pre_BKCD before RoPE), also returns its outputs stacked over layers (axis 0).
    """
    if tokens_BC.shape != pos_BC.shape or tokens_BC.ndim != 2:
        raise ValueError(f"tokens {tokens_BC.shape} and positions {pos_BC.shape} must be [B, C]")
    if policy.needs_gates and gates is None:
        raise ValueError("the policy has gated layers but no gates were given")
    if policy.needs_oracle and oracle_LBKC is None:
        raise ValueError("the policy has oracle layers but no true lifespans were given")
    inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    x = params["embed"][tokens_BC]
    new_groups, probes = [], []
    grouped = split_layers(params["layers"], cache.bounds)
    for (start, end), lc, (_, _, p), lps in zip(
        cache.bounds, cache.groups, policy.groups(), grouped
    ):
        extra = {}
        if p.kind == "gated":
            extra["gates"] = jax.tree_util.tree_map(lambda a, s=start, e=end: a[s:e], gates)
        elif p.kind == "oracle":
            extra["oracle"] = oracle_LBKC[start:end]

        def body(x, layer, p=p):
            lp, lc_one, ex = layer
            x, update, probed = _layer(lp, lc_one, x, pos_BC, ex, cfg, p, inv_freq, probe)
            return x, (update, probed)

        # The scan only reads the cache; the new rows are scattered afterwards, in place,
        # so no layer's slice of the cache is ever copied.
        x, (update, probed) = jax.lax.scan(body, x, (lps, lc, extra))
        lc = kvcache.write_rows(lc, *update)
        new_groups.append(lc)
        probes.append(probed)
    x = rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
    new_cache = KVCache(groups=tuple(new_groups), bounds=cache.bounds)
    if probe is None:
        return x, new_cache
    stacked = jax.tree_util.tree_map(lambda *a: jnp.concatenate(a, 0), *probes)
    return x, new_cache, stacked


def split_layers(layers: Any, bounds: tuple[tuple[int, int], ...]) -> tuple:
    """Stacked layer params (leaves [L, ...]) as one stacked pytree per cache group.

    Already-split params (a tuple) pass through: a decode loop splits once, outside the loop,
    because slicing inside it would copy every weight on every step.
    """
    if isinstance(layers, tuple):
        if len(layers) != len(bounds):
            raise ValueError(f"params are split into {len(layers)} groups, cache has {len(bounds)}")
        return layers
    if len(bounds) == 1:
        return (layers,)
    return tuple(jax.tree_util.tree_map(lambda a, s=s, e=e: a[s:e], layers) for s, e in bounds)


def split_for_cache(params: Params, cache: KVCache) -> Params:
    """`params` with the layers split per cache group, for a loop of jitted chunk calls:
    split once before the loop, since a jitted call on stacked params slices (copies) every
    weight on every call when the cache has several groups."""
    return {**params, "layers": split_layers(params["layers"], cache.bounds)}


def logits(params: Params, cfg: ModelConfig, hidden: jax.Array) -> jax.Array:
    """Vocabulary logits [..., V] in float32 from final hidden states [..., E]."""
    w = params["embed"].T if cfg.tie_embeddings else params["lm_head"]
    return (hidden @ w).astype(jnp.float32)


def init_params(cfg: ModelConfig, key: jax.Array, dtype: jnp.dtype = jnp.float32) -> Params:
    """Random parameters of the right shapes (tests and benchmarks without a checkpoint)."""
    e, f, l_ = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    hd, kd = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes = {
        "wq": (l_, e, hd),
        "wk": (l_, e, kd),
        "wv": (l_, e, kd),
        "wo": (l_, hd, e),
        "w_gate": (l_, e, f),
        "w_up": (l_, e, f),
        "w_down": (l_, f, e),
    }
    if cfg.qkv_bias:
        shapes.update(bq=(l_, hd), bk=(l_, kd), bv=(l_, kd))
    keys = jax.random.split(key, len(shapes) + 2)
    layers = {
        name: (0.02 * jax.random.normal(k, s)).astype(dtype)
        for k, (name, s) in zip(keys, sorted(shapes.items()))
    }
    layers["attn_norm"] = jnp.ones((l_, e), dtype)
    layers["mlp_norm"] = jnp.ones((l_, e), dtype)
    params = {
        "embed": (0.02 * jax.random.normal(keys[-2], (cfg.vocab_size, e))).astype(dtype),
        "final_norm": jnp.ones((e,), dtype),
        "layers": layers,
    }
    if not cfg.tie_embeddings:
        params["lm_head"] = (0.02 * jax.random.normal(keys[-1], (e, cfg.vocab_size))).astype(dtype)
    return params

"""Lifespan gates: one tiny MLP per (layer, KV head) predicting a key's log4 lifespan.

A gate reads the pre-RoPE key of its head and the key's absolute position and returns
`yhat = log4(1 + predicted lifespan)` (DESIGN.md: gate, label). All gates of a model are one
pytree, `Gates`, whose every leaf has leading axes [L, K] (layers, KV heads):

    norm["key_mu"], norm["key_sigma"]          [L, K, D]  per-head standardisation of the key
    norm["lognorm_mu"], norm["lognorm_sigma"]  [L, K]     standardisation of log ||key||
    norm["y_mu"], norm["y_sigma"]              [L, K]     label scale: the MLP predicts
                                                          (y - y_mu) / y_sigma
    w_in [L, K, F, H], b_in [L, K, H]          hidden layer (None when hidden == 0)
    w_out [L, K, H] (or [L, K, F]), b_out [L, K]

`norm` holds statistics of the training keys and labels (`set_normalization`), not weights:
the apply functions stop their gradient and the trainer freezes them. Features of one key
(F = `GateConfig.num_features`):

    (key - key_mu) / key_sigma                       D values
    (log ||key|| - lognorm_mu) / lognorm_sigma       1 value          (key_norm=True)
    log1p(min(pos, pos_clip)) / log1p(pos_clip)      1 value          (position=True)
    one-hot of pos for pos < n_sinks                 n_sinks values   (position=True)

Positions past `pos_clip` read as `pos_clip`: a gate trained on windows of T tokens answers
the same for every key deep in a longer context.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ACTIVATIONS = ("gelu", "relu", "tanh", "silu")
PAIRINGS = ("none", "half", "interleaved")  # how RoPE pairs the key's coordinates


@dataclasses.dataclass(frozen=True)
class GateConfig:
    """Shape and features of the gates of one model.

    hidden: width of the hidden layer (0: a linear gate on the features).
    key_norm: add the standardised log of the key's L2 norm as a feature.
    position: add log1p(position) (clipped at `pos_clip`) and a one-hot of the sink positions
        0..n_sinks-1 as features.
    activation: nonlinearity of the hidden layer.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden: int = 32
    key_norm: bool = True
    pair_norms: str = "none"
    position: bool = True
    n_sinks: int = 4
    pos_clip: int = 1024
    activation: str = "gelu"

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"GateConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden < 0:
            raise ValueError(f"GateConfig.hidden must be >= 0 (0 = linear), got {self.hidden}")
        if self.n_sinks < 0 or self.pos_clip < 1:
            raise ValueError("GateConfig needs n_sinks >= 0 and pos_clip >= 1")
        if self.pair_norms not in PAIRINGS:
            raise ValueError(
                f"unknown pair_norms {self.pair_norms!r}; known: {', '.join(PAIRINGS)}"
            )
        if self.pair_norms != "none" and self.head_dim % 2:
            raise ValueError(f"pair_norms needs an even head_dim, got {self.head_dim}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {self.activation!r}; known: {', '.join(ACTIVATIONS)}"
            )

    @property
    def num_heads(self) -> int:
        """Number of gates: L * K."""
        return self.num_layers * self.num_kv_heads

    @property
    def num_features(self) -> int:
        """Length F of a gate's input feature vector."""
        f = self.head_dim
        if self.key_norm:
            f += 1
        if self.pair_norms != "none":
            f += self.head_dim // 2
        if self.position:
            f += 1 + self.n_sinks
        return f

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GateConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown GateConfig fields: {sorted(unknown)}")
        return cls(**d)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["norm", "w_in", "b_in", "w_out", "b_out"],
    meta_fields=["cfg"],
)
@dataclasses.dataclass(frozen=True)
class Gates:
    """Parameters of all gates of a model (a pytree; `cfg` is static metadata, not a leaf).

    Leaves carry head axes in front: [L, K, ...] for a whole model (`init_gates`), [K, ...]
    for one layer (`layer_params`, or a slice taken by `lax.scan` over stacked layers), or one
    flat axis [G, ...] while training (`flatten_heads`). `w_in`/`b_in` are None for a linear
    gate (hidden == 0).
    """

    cfg: GateConfig
    norm: dict[str, jax.Array]
    w_in: jax.Array | None  # [.., F, H]
    b_in: jax.Array | None  # [.., H]
    w_out: jax.Array  # [.., H] (or [.., F] when linear)
    b_out: jax.Array  # [..]

    def to_state(self) -> dict[str, Any]:
        """Plain nested dict of the leaves (for checkpoints); inverse: `Gates.from_state`."""
        state = {"norm": dict(self.norm), "w_out": self.w_out, "b_out": self.b_out}
        if self.w_in is not None:
            state.update(w_in=self.w_in, b_in=self.b_in)
        return state

    @classmethod
    def from_state(cls, cfg: GateConfig, state: dict[str, Any]) -> Gates:
        return cls(
            cfg=cfg,
            norm=dict(state["norm"]),
            w_in=state.get("w_in"),
            b_in=state.get("b_in"),
            w_out=state["w_out"],
            b_out=state["b_out"],
        )


def init_gates(cfg: GateConfig, key: jax.Array) -> Gates:
    """Fresh gates for every (layer, KV head): every leaf has leading axes [L, K].

    Normalisation statistics start as identity (mu 0, sigma 1); `set_normalization` fills them
    from training data. The output layer starts at zero, so an untrained gate predicts y_mu.
    """
    lk = (cfg.num_layers, cfg.num_kv_heads)
    f, h, d = cfg.num_features, cfg.hidden, cfg.head_dim
    norm = {
        "key_mu": jnp.zeros((*lk, d), jnp.float32),
        "key_sigma": jnp.ones((*lk, d), jnp.float32),
        "lognorm_mu": jnp.zeros(lk, jnp.float32),
        "lognorm_sigma": jnp.ones(lk, jnp.float32),
        "pair_mu": jnp.zeros((*lk, d // 2), jnp.float32),
        "pair_sigma": jnp.ones((*lk, d // 2), jnp.float32),
        "y_mu": jnp.zeros(lk, jnp.float32),
        "y_sigma": jnp.ones(lk, jnp.float32),
    }
    if h == 0:
        return Gates(cfg, norm, None, None, jnp.zeros((*lk, f), jnp.float32), jnp.zeros(lk))
    w_in = jax.random.normal(key, (*lk, f, h), jnp.float32) / np.sqrt(f)  # LeCun normal
    return Gates(
        cfg,
        norm,
        w_in,
        jnp.zeros((*lk, h), jnp.float32),
        jnp.zeros((*lk, h), jnp.float32),
        jnp.zeros(lk, jnp.float32),
    )


def set_normalization(params: Gates, stats: dict[str, Any]) -> Gates:
    """Copy of `params` with `norm` statistics replaced by `stats` (names as in `Gates.norm`,
    shapes matching the current leaves). Missing names keep their value; sigmas are floored
    at 1e-6."""
    norm = dict(params.norm)
    for name, value in stats.items():
        if name not in norm:
            raise KeyError(f"unknown normalisation statistic {name!r}; known: {sorted(norm)}")
        value = jnp.asarray(value, jnp.float32)
        if value.shape != norm[name].shape:
            raise ValueError(f"statistic {name} has shape {value.shape}, want {norm[name].shape}")
        if name.endswith("sigma"):
            value = jnp.maximum(value, 1e-6)
        norm[name] = value
    return dataclasses.replace(params, norm=norm)


def _features(cfg: GateConfig, norm: dict, k_pre_ND: jax.Array, pos_N: jax.Array) -> jax.Array:
    """Feature matrix x_NF of N keys of one head (norm leaves of that head: [D] or [])."""
    k = k_pre_ND.astype(jnp.float32)
    parts = [(k - norm["key_mu"]) / norm["key_sigma"]]
    if cfg.key_norm:
        lognorm_N = 0.5 * jnp.log(jnp.sum(k * k, axis=-1) + 1e-12)
        parts.append(((lognorm_N - norm["lognorm_mu"]) / norm["lognorm_sigma"])[:, None])
    if cfg.pair_norms != "none":
        logpair_NP = log_pair_norms(k, cfg.pair_norms)
        parts.append((logpair_NP - norm["pair_mu"]) / norm["pair_sigma"])
    if cfg.position:
        pos_f = jnp.clip(pos_N.astype(jnp.float32), 0.0, float(cfg.pos_clip))
        parts.append((jnp.log1p(pos_f) / np.log1p(cfg.pos_clip))[:, None])
        if cfg.n_sinks:
            sinks = jnp.arange(cfg.n_sinks, dtype=jnp.int32)
            parts.append((pos_N.astype(jnp.int32)[:, None] == sinks).astype(jnp.float32))
    return jnp.concatenate(parts, axis=-1)


def log_pair_norms(k_ND, pairing: str):
    """log of the length of each rotary pair of coordinates, [..., D/2]: RoPE rotates every
    pair by an angle, so these lengths are what RoPE leaves unchanged. pairing "half":
    (i, i + D/2) (rotate-half, the transformers convention); "interleaved": (2i, 2i + 1)."""
    xp = jnp if isinstance(k_ND, jax.Array) else np
    d = k_ND.shape[-1]
    if pairing == "half":
        a, b = k_ND[..., : d // 2], k_ND[..., d // 2 :]
    else:
        a, b = k_ND[..., 0::2], k_ND[..., 1::2]
    return 0.5 * xp.log(a * a + b * b + 1e-12)


def _activation(name: str):
    return {"gelu": jax.nn.gelu, "relu": jax.nn.relu, "tanh": jnp.tanh, "silu": jax.nn.silu}[name]


def apply_head(p_head: Gates, k_pre_ND: jax.Array, pos_N: jax.Array) -> jax.Array:
    """Predicted log4 lifespan yhat_N of N keys [N, D] of one head (leaves without head axes)."""
    cfg = p_head.cfg
    norm = jax.lax.stop_gradient(p_head.norm)  # statistics, not weights
    x_NF = _features(cfg, norm, k_pre_ND, pos_N)
    if cfg.hidden == 0:
        z_N = x_NF @ p_head.w_out + p_head.b_out
    else:
        h_NH = _activation(cfg.activation)(x_NF @ p_head.w_in + p_head.b_in)
        z_N = h_NH @ p_head.w_out + p_head.b_out
    return norm["y_mu"] + norm["y_sigma"] * z_N


def apply_heads(params_G: Gates, keys_NGD: jax.Array, pos_N: jax.Array) -> jax.Array:
    """yhat_NG over one flat head axis: leaves [G, ...], keys [N, G, D], positions [N]."""
    return jax.vmap(apply_head, in_axes=(0, 1, None), out_axes=1)(params_G, keys_NGD, pos_N)


def apply_layer(params_K: Gates, k_pre_BKCD: jax.Array, pos_BC: jax.Array) -> jax.Array:
    """Predicted log4 lifespan yhat_BKC (float32) of the keys of one layer.

    params_K: one layer's gates, leaves [K, ...] (`layer_params(params, l)`, or the slice a
    `lax.scan` over stacked layers hands its body). k_pre_BKCD: pre-RoPE keys [B, K, C, D].
    pos_BC: absolute token positions [B, C] (int; padding positions may be anything).
    """
    b, k, c, d = k_pre_BKCD.shape
    keys_NKD = k_pre_BKCD.transpose(0, 2, 1, 3).reshape(b * c, k, d)
    y_NK = apply_heads(params_K, keys_NKD, pos_BC.reshape(b * c))
    return y_NK.reshape(b, c, k).transpose(0, 2, 1)


def apply_all(params: Gates, keys_NLKD: jax.Array, pos_N: jax.Array) -> jax.Array:
    """Predicted log4 lifespan yhat_NLK (float32) of N keys in every layer and KV head.

    params: leaves [L, K, ...]. keys_NLKD: pre-RoPE keys [N, L, K, D]. pos_N: positions [N].
    vmap over layers of `apply_heads` (itself a vmap over heads).
    """
    return jax.vmap(apply_heads, in_axes=(0, 1, None), out_axes=1)(params, keys_NLKD, pos_N)


def layer_params(params: Gates, layer: int) -> Gates:
    """One layer's gates: leaves [K, ...]."""
    return jax.tree.map(lambda a: a[layer], params)


def flatten_heads(params: Gates, pad_to: int | None = None) -> Gates:
    """Leaves [L, K, ...] -> [G, ...] with G = L*K, padded to `pad_to` heads by repeating head
    0 (padding heads are inert: the trainer gives them zero loss weight and drops them)."""

    def one(a):
        a = a.reshape(a.shape[0] * a.shape[1], *a.shape[2:])
        if pad_to is not None and pad_to > a.shape[0]:
            pad = jnp.broadcast_to(a[:1], (pad_to - a.shape[0], *a.shape[1:]))
            a = jnp.concatenate([a, pad], axis=0)
        return a

    return jax.tree.map(one, params)


def unflatten_heads(params_G: Gates) -> Gates:
    """Inverse of `flatten_heads`: leaves [G(+pad), ...] -> [L, K, ...] (padding dropped)."""
    nl, nk = params_G.cfg.num_layers, params_G.cfg.num_kv_heads
    return jax.tree.map(lambda a: a[: nl * nk].reshape(nl, nk, *a.shape[1:]), params_G)


def num_params(params: Gates) -> int:
    """Number of trained parameters (normalisation statistics excluded)."""
    leaves = jax.tree.leaves(dataclasses.replace(params, norm={}))
    return int(sum(np.prod(a.shape) for a in leaves))

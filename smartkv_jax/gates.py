"""Lifespan gates: one tiny MLP per (layer, KV head) predicting a key's log4 lifespan.

A gate reads the pre-RoPE key of its head and the key's absolute position and returns
`yhat = log4(1 + predicted lifespan)` (docs/design.md: gate, label). All gates of a model are
one Flax NNX module, `Gates`, whose every leaf has leading axes [L, K] (layers, KV heads):

    norm["key_mu"], norm["key_sigma"]          [L, K, D]    per-head standardisation of the key
    norm["lognorm_mu"], norm["lognorm_sigma"]  [L, K]       standardisation of log ||key||
    norm["pair_mu"], norm["pair_sigma"]        [L, K, D/2]  standardisation of log pair norms
    norm["y_mu"], norm["y_sigma"]              [L, K]       label scale: the MLP predicts
                                                            (y - y_mu) / y_sigma
    w_in [L, K, F, H], b_in [L, K, H]          hidden layer (None when hidden == 0)
    w_out [L, K, H] (or [L, K, F]), b_out [L, K]

The weights are `nnx.Param`s; `norm` holds `GateStat`s, statistics of the training keys and
labels (`set_normalization`), not weights: `nnx.state(gates, nnx.Param)` leaves them out, the
apply functions stop their gradient and the trainer never updates them. Every variable names
its logical axes in its `out_sharding` metadata (smartkv_jax/sharding.py maps them to the
mesh). The checkpoint payload is the nested dict `to_state()` returns (`from_state` reads it).

Features of one key (F = `GateConfig.num_features`):

    (key - key_mu) / key_sigma                       D values
    (log ||key|| - lognorm_mu) / lognorm_sigma       1 value          (key_norm=True)
    (log pair norms - pair_mu) / pair_sigma          D/2 values       (pair_norms != "none")
    log1p(min(pos, pos_clip)) / log1p(pos_clip)      1 value          (position=True)
    one-hot of pos for pos < n_sinks                 n_sinks values   (position=True)

Positions past `pos_clip` read as `pos_clip`: a gate trained on windows of T tokens answers
the same for every key deep in a longer context.

The math is generic over the leading head axes: `apply_head` takes leaves without head axes,
`apply_heads` one flat axis [G, ...], `apply_layer` one layer [K, ...] (`layer_params`, a
`lax.scan` slice, or `predict_layer` on a sliced `nnx.split` state), `apply_all` [L, K, ...].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .jsonio import dumps

ACTIVATIONS = ("gelu", "relu", "tanh", "silu")
PAIRINGS = ("none", "half", "interleaved")  # how RoPE pairs the key's coordinates
LK = ("layers", "kv_heads")
# Logical axes of every statistic in the whole-model layout (the pair axis D/2 is unnamed).
STAT_AXES = {
    "key_mu": (*LK, "head_dim"),
    "key_sigma": (*LK, "head_dim"),
    "lognorm_mu": LK,
    "lognorm_sigma": LK,
    "pair_mu": (*LK, None),
    "pair_sigma": (*LK, None),
    "y_mu": LK,
    "y_sigma": LK,
}


@dataclasses.dataclass(frozen=True)
class GateConfig:
    """Shape and features of the gates of one model.

    hidden: width of the hidden layer (0: a linear gate on the features).
    key_norm: add the standardised log of the key's L2 norm as a feature.
    pair_norms: add the standardised log length of every RoPE coordinate pair ("half" or
        "interleaved" pairing, see `log_pair_norms`; "none": no such features).
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
        return dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GateConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown GateConfig fields: {sorted(unknown)}")
        return cls(**d)


class GateStat(nnx.Variable):
    """A normalisation statistic of the training keys or labels: module state that is not a
    weight, so `nnx.state(gates, nnx.Param)` and the trainer's optimiser leave it out."""


def _param(value, axes: tuple[str | None, ...]) -> nnx.Param:
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


class Gates(nnx.Module):
    """All gates of a model (see the module docstring for the leaves; `cfg` is static).

    Built with leaves [L, K, ...] (`init_gates`, `from_state`); `layer_params`,
    `flatten_heads` and `unflatten_heads` give the [K, ...] and flat [G, ...] layouts (a
    `lax.scan` over the module or its state hands its body [K, ...] slices that keep the
    whole-model axis names). `w_in`/`b_in` are None for a linear gate (hidden == 0).
    """

    def __init__(
        self,
        cfg: GateConfig,
        norm: dict[str, Any],
        w_in: jax.Array | None,  # [L, K, F, H]
        b_in: jax.Array | None,  # [L, K, H]
        w_out: jax.Array,  # [L, K, H] (or [L, K, F] when linear)
        b_out: jax.Array,  # [L, K]
    ):
        self.cfg = cfg
        self.norm = nnx.Dict(
            {
                n: GateStat(v, out_sharding=STAT_AXES[n], eager_sharding=False)
                for n, v in norm.items()
            }
        )
        hidden_axis = "hidden" if cfg.hidden else "features"
        self.w_in = None if w_in is None else _param(w_in, (*LK, "features", "hidden"))
        self.b_in = None if b_in is None else _param(b_in, (*LK, "hidden"))
        self.w_out = _param(w_out, (*LK, hidden_axis))
        self.b_out = _param(b_out, LK)

    def __call__(self, keys_NLKD: jax.Array, pos_N: jax.Array) -> jax.Array:
        """Predicted log4 lifespan yhat_NLK of N keys in every layer and KV head (`apply_all`)."""
        return apply_all(self, keys_NLKD, pos_N)

    def to_state(self) -> dict[str, Any]:
        """The checkpoint payload: {"norm": {name: array}, "w_in", "b_in", "w_out", "b_out"}
        (no w_in/b_in when linear); inverse: `Gates.from_state`."""
        return nnx.to_pure_dict(nnx.state(self))

    @classmethod
    def from_state(cls, cfg: GateConfig, state: dict[str, Any]) -> Gates:
        return cls(
            cfg, state["norm"], state.get("w_in"), state.get("b_in"), state["w_out"], state["b_out"]
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
    state = params.to_state()
    norm = state["norm"]
    for name, value in stats.items():
        if name not in norm:
            raise KeyError(f"unknown normalisation statistic {name!r}; known: {sorted(norm)}")
        value = jnp.asarray(value, jnp.float32)
        if value.shape != norm[name].shape:
            raise ValueError(f"statistic {name} has shape {value.shape}, want {norm[name].shape}")
        if name.endswith("sigma"):
            value = jnp.maximum(value, 1e-6)
        norm[name] = value
    return Gates.from_state(params.cfg, state)


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
    norm = {n: jax.lax.stop_gradient(v[...]) for n, v in p_head.norm.items()}  # not weights
    x_NF = _features(cfg, norm, k_pre_ND, pos_N)
    if cfg.hidden == 0:
        z_N = x_NF @ p_head.w_out[...] + p_head.b_out[...]
    else:
        h_NH = _activation(cfg.activation)(x_NF @ p_head.w_in[...] + p_head.b_in[...])
        z_N = h_NH @ p_head.w_out[...] + p_head.b_out[...]
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


def predict_layer(
    graphdef: nnx.GraphDef, state_K: nnx.State, k_pre_BKCD: jax.Array, pos_BC: jax.Array
) -> jax.Array:
    """`apply_layer` on split gates: (graphdef, state) = nnx.split(gates) with every leaf of
    `state` sliced to one layer ([K, ...], e.g. by a `lax.scan` over the state). -> yhat_BKC."""
    return apply_layer(nnx.merge(graphdef, state_K), k_pre_BKCD, pos_BC)


def apply_all(params: Gates, keys_NLKD: jax.Array, pos_N: jax.Array) -> jax.Array:
    """Predicted log4 lifespan yhat_NLK (float32) of N keys in every layer and KV head.

    params: leaves [L, K, ...]. keys_NLKD: pre-RoPE keys [N, L, K, D]. pos_N: positions [N].
    vmap over layers of `apply_heads` (itself a vmap over heads).
    """
    return jax.vmap(apply_heads, in_axes=(0, 1, None), out_axes=1)(params, keys_NLKD, pos_N)


def _map_leaves(g: Gates, fn: Callable, axes_fn: Callable) -> Gates:
    """Copy of `g` with `fn` applied to every leaf and `axes_fn` to its logical axis names."""
    return jax.tree.map(
        lambda v: v.replace(fn(v[...]), out_sharding=axes_fn(v.get_metadata("out_sharding"))),
        g,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def layer_params(params: Gates, layer: int) -> Gates:
    """One layer's gates: leaves [K, ...]."""
    return _map_leaves(params, lambda a: a[layer], lambda axes: axes[1:])


def flatten_heads(params: Gates, pad_to: int | None = None) -> Gates:
    """Leaves [L, K, ...] -> [G, ...] with G = L*K (logical axis "heads"), padded to `pad_to`
    heads by repeating head 0 (padding heads are inert: the trainer gives them zero loss
    weight and drops them)."""

    def one(a):
        a = a.reshape(a.shape[0] * a.shape[1], *a.shape[2:])
        if pad_to is not None and pad_to > a.shape[0]:
            pad = jnp.broadcast_to(a[:1], (pad_to - a.shape[0], *a.shape[1:]))
            a = jnp.concatenate([a, pad], axis=0)
        return a

    return _map_leaves(params, one, lambda axes: ("heads", *axes[2:]))


def unflatten_heads(params_G: Gates) -> Gates:
    """Inverse of `flatten_heads`: leaves [G(+pad), ...] -> [L, K, ...] (padding dropped)."""
    nl, nk = params_G.cfg.num_layers, params_G.cfg.num_kv_heads
    return _map_leaves(
        params_G,
        lambda a: a[: nl * nk].reshape(nl, nk, *a.shape[1:]),
        lambda axes: (*LK, *axes[1:]),
    )


def num_params(params: Gates) -> int:
    """Number of trained parameters (normalisation statistics excluded)."""
    return int(sum(np.prod(a.shape) for a in jax.tree.leaves(nnx.state(params, nnx.Param))))

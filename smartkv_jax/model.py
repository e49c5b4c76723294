"""Llama / Mistral / Qwen2 / Qwen3 / Gemma 3 decoder as Flax NNX modules over the fixed-shape
KV cache (docs/design.md: parts and layers, the cache, model families). The families differ
only in ModelConfig fields: q/k norms, (1 + w) norms, sandwich norms, the MLP activation, the
embedding scale, attention scale, the final soft-cap, and per-layer attention windows and RoPE
bases.

`Transformer` holds the embedding, the final norm, the LM head and the decoder layers as
`LayerStack`s: every weight of a stack is stacked on a leading layer axis, so the layers of
one cache group run under one `lax.scan`. Weights (each an `nnx.Param` whose `out_sharding`
names its logical axes, smartkv_jax/sharding.py maps them to the mesh):

    embed [V, E], final_norm [E], lm_head [E, V] (absent when the embeddings are tied)
    per stack of N layers: attn_norm [N, E], wq [N, E, H*D], wk/wv [N, E, K*D],
    bq [N, H*D], bk/bv [N, K*D] (qkv_bias only), q_norm/k_norm [N, D] (qk_norm only),
    wo [N, H*D, E], post_attn_norm [N, E] (sandwich_norms only), mlp_norm [N, E],
    w_gate/w_up [N, E, F], w_down [N, F, E], post_mlp_norm [N, E] (sandwich_norms only)

The model never names an eviction policy: each layer asks its policy (smartkv_jax/policy.py)
for visible slots, scores and ranks, and hands it the layer's slice of any side input.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from . import cache as kvcache
from .attention import AttentionRule, attend
from .cache import KVCache, LayerCache
from .config import ModelConfig, RopeScaling
from .policy import CachePolicy, ChunkView
from .policy_table import PolicyConfig
from .rope import rotate

Probe = Callable[[jax.Array, jax.Array, jax.Array], Any]

# Logical axes of every weight (layer weights lead with "layers").
LAYER_AXES = {
    "attn_norm": ("layers", "embed"),
    "wq": ("layers", "embed", "q_heads"),
    "wk": ("layers", "embed", "kv_heads"),
    "wv": ("layers", "embed", "kv_heads"),
    "bq": ("layers", "q_heads"),
    "bk": ("layers", "kv_heads"),
    "bv": ("layers", "kv_heads"),
    "q_norm": ("layers", "head_dim"),
    "k_norm": ("layers", "head_dim"),
    "wo": ("layers", "q_heads", "embed"),
    "post_attn_norm": ("layers", "embed"),
    "mlp_norm": ("layers", "embed"),
    "w_gate": ("layers", "embed", "mlp"),
    "w_up": ("layers", "embed", "mlp"),
    "w_down": ("layers", "mlp", "embed"),
    "post_mlp_norm": ("layers", "embed"),
}
# weights only some families have, by the config flag that asks for them
OPTIONAL = {
    "bq": "qkv_bias",
    "bk": "qkv_bias",
    "bv": "qkv_bias",
    "q_norm": "qk_norm",
    "k_norm": "qk_norm",
    "post_attn_norm": "sandwich_norms",
    "post_mlp_norm": "sandwich_norms",
}


def layer_weight_names(cfg: ModelConfig) -> list[str]:
    """The per-layer weights a model of this config has."""
    return [n for n in LAYER_AXES if n not in OPTIONAL or getattr(cfg, OPTIONAL[n])]


TOP_AXES = {"embed": ("vocab", "embed"), "final_norm": ("embed",), "lm_head": ("embed", "vocab")}


def _param(value: jax.Array, axes: tuple[str, ...]) -> nnx.Param:
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling) -> jax.Array:
    """Inverse frequencies [D/2] (radians per position), with the llama3 rule if asked."""
    inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling.kind == "linear":
        return inv / scaling.factor
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
    ang = jnp.maximum(pos_BC, 0).astype(jnp.float32)[:, None, :, None] * inv_freq  # [B,1,C,D/2]
    return rotate(x_BNCD, jnp.cos(ang), jnp.sin(ang)).astype(x_BNCD.dtype)


def rms_norm(x: jax.Array, w: jax.Array, eps: float, plus_one: bool = False) -> jax.Array:
    """RMSNorm over the last axis in float32; weights applied as (1 + w) when `plus_one`."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + eps)
    wf = w.astype(jnp.float32)
    return (y * (1.0 + wf if plus_one else wf)).astype(x.dtype)


def soft_cap(x: jax.Array, cap: float | None) -> jax.Array:
    return x if cap is None else cap * jnp.tanh(x / cap)


ACTIVATION_FNS = {"silu": jax.nn.silu, "gelu_tanh": partial(jax.nn.gelu, approximate=True)}


@partial(
    jax.tree_util.register_dataclass, data_fields=["hidden", "cache", "probes"], meta_fields=[]
)
@dataclasses.dataclass
class ForwardOutput:
    """What a chunk through the model gives back.

    hidden: final-normed hidden states [B, C, E] (`Transformer.logits` turns them into
    logits; they are not computed here because a prefill chunk needs them for one column).
    cache: the updated cache. probes: the probe's outputs stacked over layers, or None.
    """

    hidden: jax.Array
    cache: KVCache
    probes: Any = None


@dataclasses.dataclass(frozen=True)
class LayerUpdate:
    """One layer's cache update after a chunk (stacked over a group's layers by the scan):
    slot pos/score [B, K, S], dest [B, K, C] (slot of each new token, S: not kept), new k/v
    rows [B, K, C, D] to write there (`cache.write_rows`)."""

    pos: jax.Array
    score: jax.Array
    dest: jax.Array
    k: jax.Array
    v: jax.Array


jax.tree_util.register_dataclass(
    LayerUpdate, data_fields=["pos", "score", "dest", "k", "v"], meta_fields=[]
)


class LayerStack(nnx.Module):
    """N decoder layers, every weight stacked on a leading axis [N, ...]. Called on a stack
    of one layer's weights (the slice `lax.scan` hands its body), it runs that layer."""

    def __init__(self, cfg: ModelConfig, weights: dict[str, jax.Array]):
        self.cfg = cfg
        names = layer_weight_names(cfg)
        missing = sorted(set(names) - set(weights))
        if missing:
            raise ValueError(f"layer weights missing: {missing}")
        for name in names:
            setattr(self, name, _param(weights[name], LAYER_AXES[name]))

    def weights(self) -> dict[str, jax.Array]:
        """The stack's weights by name (each [N, ...])."""
        return {n: getattr(self, n)[...] for n in LAYER_AXES if hasattr(self, n)}

    def _norm(self, x: jax.Array, name: str) -> jax.Array:
        cfg = self.cfg
        return rms_norm(x, getattr(self, name)[...], cfg.rms_norm_eps, cfg.norm_plus_one)

    def _qkv(self, h_BCE: jax.Array):
        """Queries [B, H, C, D], keys and values [B, K, C, D], q/k normed (before RoPE)."""
        cfg = self.cfg
        b, c, _ = h_BCE.shape
        q, k, v = h_BCE @ self.wq[...], h_BCE @ self.wk[...], h_BCE @ self.wv[...]
        if cfg.qkv_bias:
            q, k, v = q + self.bq[...], k + self.bk[...], v + self.bv[...]
        d = cfg.head_dim
        q = q.reshape(b, c, cfg.num_heads, d).transpose(0, 2, 1, 3)  # [B, H, C, D]
        k = k.reshape(b, c, cfg.num_kv_heads, d).transpose(0, 2, 1, 3)  # [B, K, C, D]
        v = v.reshape(b, c, cfg.num_kv_heads, d).transpose(0, 2, 1, 3)
        if cfg.qk_norm:
            q, k = self._norm(q, "q_norm"), self._norm(k, "k_norm")
        return q, k, v

    def _mlp(self, x_BCE: jax.Array) -> jax.Array:
        """The MLP's residual branch (its norms included)."""
        h = self._norm(x_BCE, "mlp_norm")
        act = ACTIVATION_FNS[self.cfg.activation]
        out = (act(h @ self.w_gate[...]) * (h @ self.w_up[...])) @ self.w_down[...]
        return self._norm(out, "post_mlp_norm") if self.cfg.sandwich_norms else out

    def __call__(
        self,
        x_BCE: jax.Array,
        pos_BC: jax.Array,
        lc: LayerCache,
        policy: CachePolicy,
        aux: Any,
        inv_freq: jax.Array,
        kernels: str,
        mesh: Mesh | None,
        probe: Probe | None,
    ) -> tuple[jax.Array, LayerUpdate, Any]:
        """One layer over a chunk, reading its cache `lc` under `policy` (aux: the layer's
        side input). Returns the new hidden states, the cache update and the probe's output."""
        b, c, _ = x_BCE.shape
        cfg = self.cfg
        q, k_pre, v = self._qkv(self._norm(x_BCE, "attn_norm"))
        q = apply_rope(q, pos_BC, inv_freq)
        k = apply_rope(k_pre, pos_BC, inv_freq)
        t_B = jnp.max(pos_BC, axis=1)  # newest position of each row after this chunk
        visible = policy.visible(lc.pos, lc.score, t_B)
        rule = AttentionRule(cfg.scale, policy.window)
        out, lse = attend(lc, visible, q, k, v, pos_BC, rule, kernels, mesh)
        out = out.astype(x_BCE.dtype).transpose(0, 2, 1, 3).reshape(b, c, -1) @ self.wo[...]
        x = x_BCE + (self._norm(out, "post_attn_norm") if cfg.sandwich_norms else out)
        x = x + self._mlp(x)
        view = ChunkView(lc, visible, q, k, k_pre, pos_BC, t_B, lse, aux, rule, v)
        update = _evict(policy, view, v)
        return x, update, None if probe is None else probe(q, k, k_pre)


def _evict(policy: CachePolicy, view: ChunkView, v_BKCD: jax.Array) -> LayerUpdate:
    """Where the chunk's tokens go under `policy`: slot scores, ranks, then the slot choice."""
    score, new_score = policy.chunk_scores(view)
    rank = policy.ranks(view.cache.pos, score, view.t_B)
    new_rank = policy.ranks(view.pos_BKC, new_score, view.t_B)
    pos, score, dest = kvcache.choose_slots(
        view.cache, score, rank, view.pos_BC, new_score, new_rank
    )
    return LayerUpdate(pos, score, dest, view.k_BKCD, v_BKCD)


def _layer_range(arrays: list[jax.Array], bounds, a: int, b: int) -> jax.Array:
    """Layers a..b-1 [b - a, ...] of a weight held as `arrays`, one [end - start, ...] per
    stack of `bounds`: the stack itself when it is exactly that range, else the slices of
    the stacks it overlaps, joined."""
    pieces = [
        w if (start, end) == (a, b) else w[max(a, start) - start : min(b, end) - start]
        for w, (start, end) in zip(arrays, bounds)
        if start < b and a < end
    ]
    return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces)


class Transformer(nnx.Module):
    """The decoder: embedding, `stacks` of layers (covering layers `bounds`), final norm and
    LM head. Build it with `Transformer.from_weights` or `Transformer.init_random`."""

    def __init__(
        self,
        cfg: ModelConfig,
        top: dict[str, jax.Array],
        stacks: list[LayerStack],
        bounds: tuple[tuple[int, int], ...],
    ):
        self.cfg = cfg
        self.embed = _param(top["embed"], TOP_AXES["embed"])
        self.final_norm = _param(top["final_norm"], TOP_AXES["final_norm"])
        if not cfg.tie_embeddings:
            self.lm_head = _param(top["lm_head"], TOP_AXES["lm_head"])
        self.stacks = nnx.List(stacks)
        self.bounds = bounds

    @classmethod
    def from_weights(cls, cfg: ModelConfig, weights: dict[str, Any]) -> Transformer:
        """From {"embed", "final_norm", "lm_head"?, "layers": {name: [L, ...]}}."""
        layers = LayerStack(cfg, weights["layers"])
        top = {k: v for k, v in weights.items() if k != "layers"}
        return cls(cfg, top, [layers], ((0, cfg.num_layers),))

    @classmethod
    def init_random(
        cls, cfg: ModelConfig, key: jax.Array, dtype: jnp.dtype = jnp.float32
    ) -> Transformer:
        """Random weights of the right shapes (tests and benchmarks without a checkpoint)."""
        return cls.from_weights(cfg, random_weights(cfg, key, dtype))

    @property
    def dtype(self) -> jnp.dtype:
        return self.embed[...].dtype

    def regroup(self, bounds: tuple[tuple[int, int], ...]) -> Transformer:
        """The same model with its layers stacked per cache group `bounds` (a new module; this
        one is unchanged). Inside a jitted call this slices the stacks, so eager loops use
        `group_layers` once before they start instead."""
        if bounds == self.bounds:
            return self
        old = self._weights_by_name()
        top = {"embed": self.embed[...], "final_norm": self.final_norm[...]}
        if not self.cfg.tie_embeddings:
            top["lm_head"] = self.lm_head[...]
        stacks = [LayerStack(self.cfg, w) for w in self._restacked(old, bounds)]
        return Transformer(self.cfg, top, stacks, tuple(bounds))

    def group_layers(self, bounds: tuple[tuple[int, int], ...]) -> None:
        """Restack this model's layers per cache group `bounds`, in place. A loop of jitted
        chunk calls groups once before the loop (slicing a stack inside a jitted call would
        copy every weight on every call). The old stacks are let go one weight name at a
        time, so the process holds one copy of the layer weights, plus at most one name's
        worth while it restacks, and not the two copies a new module would mean."""
        if bounds == self.bounds:
            return
        old = self._weights_by_name()
        self.stacks = nnx.List([])  # `old` now holds the only references to the old weights
        grouped = self._restacked(old, bounds)
        self.stacks = nnx.List([LayerStack(self.cfg, w) for w in grouped])
        self.bounds = tuple(bounds)

    def _weights_by_name(self) -> dict[str, list[jax.Array]]:
        """name -> that weight's arrays, one per current stack."""
        return {n: [s.weights()[n] for s in self.stacks] for n in self.stacks[0].weights()}

    def _restacked(self, old: dict[str, list[jax.Array]], bounds) -> list[dict[str, jax.Array]]:
        """Per new group of `bounds`, its weights {name: [b - a, ...]} cut from `old` (name ->
        the arrays of the current stacks). Consumes `old` name by name, so a name's old
        arrays can be freed before the next name is restacked."""
        grouped: list[dict[str, jax.Array]] = [{} for _ in bounds]
        for name in list(old):
            arrays = old.pop(name)
            for group, (a, b) in zip(grouped, bounds):
                group[name] = _layer_range(arrays, self.bounds, a, b)
        return grouped

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Vocabulary logits [..., V] in float32 from final hidden states [..., E]."""
        w = self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]
        return soft_cap((hidden @ w).astype(jnp.float32), self.cfg.final_softcap)

    def inv_freq(self, window: int) -> jax.Array:
        """RoPE inverse frequencies [D/2] of a layer with attention `window` (0: global):
        windowed layers have their own base where the config sets one (Gemma 3)."""
        cfg = self.cfg
        if window and cfg.local_rope_theta is not None:
            return rope_inv_freq(cfg.head_dim, cfg.local_rope_theta, RopeScaling())
        return rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)

    def __call__(
        self,
        tokens_BC: jax.Array,
        pos_BC: jax.Array,
        cache: KVCache,
        policy: PolicyConfig,
        aux: dict[str, Any] | None = None,
        probe: Probe | None = None,
    ) -> ForwardOutput:
        """Run a chunk of C tokens (positions pos_BC, -1 = padding) through every layer.

        Reads and updates `cache` (it goes in and comes out). aux: the side inputs the
        policy's layers need (`PolicyConfig.needs`), each a pytree with leading layer axis L
        (gates: a `Gates` module; oracle: true log4 lifespans [L, B, K, T]). With `probe`, a
        function of one layer's (q_BHCD after RoPE, k_BKCD after RoPE, k_pre_BKCD before
        RoPE), `probes` holds its outputs stacked over layers (axis 0).
        """
        aux = _check_call(self.cfg, tokens_BC, pos_BC, policy, aux or {})
        model = self.regroup(cache.bounds)
        x = model.embed[...][tokens_BC]
        if self.cfg.embed_scale:  # Gemma: sqrt(E), rounded to the model's dtype first
            x = x * jnp.asarray(math.sqrt(self.cfg.hidden_size), x.dtype)
        groups, probes = [], []
        for stack, (start, end), lc, (_, _, p) in zip(
            model.stacks, cache.bounds, cache.groups, policy.groups()
        ):
            aux_g = {n: jax.tree.map(lambda a, s=start, e=end: a[s:e], aux[n]) for n in aux}
            layer_aux = aux_g.get(p.needs) if p.needs else None

            inv_freq = self.inv_freq(p.window)

            def body(x, layer, p=p, inv_freq=inv_freq):
                weights, lc_one, aux_one = layer
                x, update, probed = weights(
                    x, pos_BC, lc_one, p, aux_one, inv_freq, cache.kernels, cache.mesh, probe
                )
                return x, (update, probed)

            # The scan only reads the cache; the new rows are scattered afterwards, in place,
            # so no layer's slice of the cache is ever copied.
            x, (u, probed) = jax.lax.scan(body, x, (stack, lc, layer_aux))
            groups.append(kvcache.write_rows(lc, u.pos, u.score, u.dest, u.k, u.v))
            probes.append(probed)
        x = rms_norm(x, model.final_norm[...], self.cfg.rms_norm_eps, self.cfg.norm_plus_one)
        new_cache = dataclasses.replace(cache, groups=tuple(groups))
        if probe is None:
            return ForwardOutput(x, new_cache)
        stacked = jax.tree_util.tree_map(lambda *a: jnp.concatenate(a, 0), *probes)
        return ForwardOutput(x, new_cache, stacked)


def _check_call(cfg, tokens_BC, pos_BC, policy: PolicyConfig, aux: dict) -> dict:
    """The side inputs the policy needs, with clear errors for bad calls."""
    if tokens_BC.shape != pos_BC.shape or tokens_BC.ndim != 2:
        raise ValueError(f"tokens {tokens_BC.shape} and positions {pos_BC.shape} must be [B, C]")
    if len(policy.layers) != cfg.num_layers:
        raise ValueError(f"policy has {len(policy.layers)} layers, model has {cfg.num_layers}")
    policy.check_windows(cfg.layer_windows)
    missing = sorted(n for n in policy.needs if aux.get(n) is None)
    if missing:
        raise ValueError(f"the policy's layers need side inputs that were not given: {missing}")
    return {n: aux[n] for n in policy.needs}


def _normal(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype) -> jax.Array:
    """N(0, 0.02) of `shape` drawn directly in `dtype` on the device: a bf16 weight never has
    a float32 copy."""
    return 0.02 * jax.random.normal(key, shape, dtype)


def random_weights(cfg: ModelConfig, key: jax.Array, dtype: jnp.dtype) -> dict[str, Any]:
    """Random weights {"embed", "final_norm", "lm_head"?, "layers": {...}} in `dtype`
    (N(0, 0.02), norms the identity: ones, or zeros where `norm_plus_one`)."""
    e, f, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    hd, kd = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes = {
        "wq": (n, e, hd),
        "wk": (n, e, kd),
        "wv": (n, e, kd),
        "wo": (n, hd, e),
        "w_gate": (n, e, f),
        "w_up": (n, e, f),
        "w_down": (n, f, e),
    }
    if cfg.qkv_bias:
        shapes.update(bq=(n, hd), bk=(n, kd), bv=(n, kd))
    keys = jax.random.split(key, len(shapes) + 2)
    layers = {name: _normal(k, s, dtype) for k, (name, s) in zip(keys, sorted(shapes.items()))}
    norm = jnp.zeros if cfg.norm_plus_one else jnp.ones  # the identity either way
    norms = {"q_norm": cfg.head_dim, "k_norm": cfg.head_dim}
    for name in layer_weight_names(cfg):
        if name.endswith("norm"):
            layers[name] = norm((n, norms.get(name, e)), dtype)
    weights = {
        "embed": _normal(keys[-2], (cfg.vocab_size, e), dtype),
        "final_norm": norm((e,), dtype),
        "layers": layers,
    }
    if not cfg.tie_embeddings:
        weights["lm_head"] = _normal(keys[-1], (e, cfg.vocab_size), dtype)
    return weights

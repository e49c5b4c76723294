"""The gate trainer's state on the mesh and in its checkpoints (docs/design.md: sharding and
scale).

While training, the gates live as `nnx.split(flatten_heads(gates))`: a static graphdef and
two states whose leaves have one flat head axis G = L*K, padded to a multiple of the mesh's
"model" size and sharded over it (smartkv_jax/sharding.py): the weights (`nnx.Param`), which
AdamW updates, and the normalisation statistics (`GateStat`), which stay frozen.
`TrainState` holds them with the optimiser state and the step.

Checkpoints hold the device-independent layout instead (smartkv_jax/gate_checkpoint.py):
`Gates.to_state()` with leaves [L, K, ...], the optimiser leaves likewise (padding dropped),
and the step, so a run resumes on any mesh.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from smartkv_jax import sharding as shd
from smartkv_jax.gates import (
    GateConfig,
    Gates,
    GateStat,
    flatten_heads,
    init_gates,
    unflatten_heads,
)

from .batches import batch_shardings
from .metrics import loss_fn

if TYPE_CHECKING:
    from .train_gates import TrainConfig

DECAYED = ("w_in", "w_out")  # weight decay on the weight matrices only
# Checkpoints number the optimiser's leaves with the parameters in this order (the leaf order
# of the gates' first pytree form), so checkpoints of every version resume.
CKPT_PARAM_ORDER = ("w_in", "b_in", "w_out", "b_out")


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["weights", "stats", "opt", "step"],
    meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
class TrainState:
    """weights: `nnx.Param` state, leaves [G, ...]; stats: `GateStat` state, leaves [G, ...];
    opt: the optimiser state of `weights`; step: int32 []."""

    weights: nnx.State
    stats: nnx.State
    opt: Any
    step: jax.Array


def checkpoint_order(opt) -> list[int]:
    """Tree positions of the optimiser state's leaves in checkpoint order: tree order, with
    the parameters inside each per-parameter group (Adam's mu, nu, ...) in CKPT_PARAM_ORDER."""
    keys = []
    for i, (path, _) in enumerate(jax.tree_util.tree_leaves_with_path(opt)):
        names = [getattr(k, "key", None) for k in path]
        at = next((j for j, n in enumerate(names) if n in CKPT_PARAM_ORDER), len(path))
        group = jax.tree_util.keystr(path[:at])
        rank = CKPT_PARAM_ORDER.index(names[at]) if at < len(path) else 0
        keys.append((group, rank, i))
    first = {}
    for group, _, i in keys:
        first.setdefault(group, i)
    return [i for _, _, i in sorted(keys, key=lambda k: (first[k[0]], k[1]))]


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """AdamW (decay on w_in/w_out only) on a warmup-cosine schedule, for the weights state."""
    warmup = min(cfg.warmup, max(cfg.steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=warmup,
        decay_steps=max(cfg.steps, warmup + 1),
        end_value=cfg.lr * cfg.final_lr_frac,
    )

    def decay_mask(weights):
        return jax.tree_util.tree_map_with_path(lambda path, _: path[0].key in DECAYED, weights)

    return optax.adamw(schedule, weight_decay=cfg.weight_decay, mask=decay_mask)


class StateFns:
    """The jitted functions on one run's `TrainState` (mesh, gate config and train config
    fixed): `fresh`, `train_step`, `gates`, and the conversions to and from the checkpoint layout.

    shardings: the TrainState's shardings (flat head axis over "model", scalars replicated).
    canon_abstract: the checkpoint layout as jax.ShapeDtypeStructs (replicated), to restore.
    """

    def __init__(self, cfg: TrainConfig, gate: GateConfig, mesh, g_pad: int, head_w_G):
        template = flatten_heads(init_gates(gate, jax.random.key(0)), pad_to=g_pad)
        self.graphdef, weights, stats = nnx.split(template, nnx.Param, GateStat)
        self.tx = make_optimizer(cfg)
        self.gate, self.g_pad, self.mesh = gate, g_pad, mesh
        shape = jax.eval_shape(self._init, weights, stats)
        self.opt_def = jax.tree.structure(shape.opt)
        self.opt_order = checkpoint_order(shape.opt)
        self.shardings = jax.tree.map(lambda a: shd.heads_sharding(mesh, a.ndim), shape)
        canon_shape = jax.eval_shape(self._to_canonical, shape)
        repl = jax.tree.map(lambda _: shd.replicated(mesh), canon_shape)
        self.canon_abstract = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), canon_shape, repl
        )
        self.init = jax.jit(self._init, out_shardings=self.shardings)
        self.to_canonical = jax.jit(
            self._to_canonical, in_shardings=(self.shardings,), out_shardings=repl
        )
        self.from_canonical = jax.jit(
            self._from_canonical, in_shardings=(repl,), out_shardings=self.shardings
        )
        objective = functools.partial(
            loss_fn, head_w_G=jnp.asarray(head_w_G), loss=cfg.loss, huber_delta=cfg.huber_delta
        )
        self.train_step = jax.jit(
            functools.partial(self._step, objective),
            in_shardings=(self.shardings, batch_shardings(mesh)),
            out_shardings=(self.shardings, shd.replicated(mesh)),
            donate_argnums=(0,),
        )

    def fresh(self, gates: Gates) -> TrainState:
        """The initial state of gates with leaves [L, K, ...] (host arrays)."""
        flat = flatten_heads(gates, pad_to=self.g_pad)
        flat = shd.shard_tree(flat, shd.gate_shardings(flat, self.mesh))
        _, weights, stats = nnx.split(flat, nnx.Param, GateStat)
        return self.init(weights, stats)

    def gates(self, state: TrainState) -> Gates:
        """The flat gates (leaves [G, ...]) of a state."""
        return nnx.merge(self.graphdef, state.weights, state.stats)

    def _init(self, weights: nnx.State, stats: nnx.State) -> TrainState:
        return TrainState(weights, stats, self.tx.init(weights), jnp.zeros((), jnp.int32))

    def _step(self, objective, state: TrainState, batch) -> tuple[TrainState, jax.Array]:
        def loss_of(weights):
            return objective(nnx.merge(self.graphdef, weights, state.stats), batch)

        loss, grads = jax.value_and_grad(loss_of)(state.weights)
        updates, opt = self.tx.update(grads, state.opt, state.weights)
        weights = optax.apply_updates(state.weights, updates)
        return TrainState(weights, state.stats, opt, state.step + 1), loss

    def _to_canonical(self, state: TrainState) -> dict[str, Any]:
        nl, nk = self.gate.num_layers, self.gate.num_kv_heads
        leaves = jax.tree.leaves(state.opt)
        opt = {
            str(j): (x[: nl * nk].reshape(nl, nk, *x.shape[1:]) if x.ndim >= 1 else x)
            for j, x in enumerate(leaves[i] for i in self.opt_order)
        }
        params = unflatten_heads(self.gates(state)).to_state()
        return {"params": params, "opt": opt, "step": state.step}

    def _from_canonical(self, c: dict[str, Any]) -> TrainState:
        gates = flatten_heads(Gates.from_state(self.gate, c["params"]), pad_to=self.g_pad)
        _, weights, stats = nnx.split(gates, nnx.Param, GateStat)
        g = self.gate.num_heads

        def pad0(x):  # optimiser moments of padding heads start at zero
            x = x.reshape(g, *x.shape[2:])
            return jnp.concatenate([x, jnp.zeros((self.g_pad - g, *x.shape[1:]), x.dtype)])

        opt = [None] * len(self.opt_order)
        for j, i in enumerate(self.opt_order):
            x = c["opt"][str(j)]
            opt[i] = pad0(x) if x.ndim >= 2 else x
        return TrainState(weights, stats, jax.tree.unflatten(self.opt_def, opt), c["step"])

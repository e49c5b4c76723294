"""Train the lifespan gates on a label store (docs/design.md: gate, label, censoring, R²).

    smartkv train-gates --train labels/train --eval labels/test --tau 0.05 --ckpt-dir ckpt/gates

`train_gates` runs these pieces, each in its own module:

- train/label_store.py: the training and held-out label stores (several training stores of
  the same model and labelling settings join into one).
- train/batches.py: trainable rows dealt into `data_shards` fixed shards with seeded streams,
  so a batch is a pure function of (seed, step) for any number of devices or processes; the
  normalisation statistics from per-shard float64 sums.
- train/train_state.py: the gates as `nnx.split` states with one flat head axis sharded over
  the mesh's "model" axis, batch rows over "data"; `jax.jit` steps with explicit in/out
  shardings; AdamW on a warmup-cosine schedule, the normalisation statistics frozen.
- train/metrics.py: the losses and the held-out R² (with and without the first SINKS
  positions).
- smartkv_jax/gate_checkpoint.py: orbax checkpoints every `ckpt_every` steps in the
  device-independent [L, K, ...] layout with JSON metadata. A restart resumes from the latest
  step and continues exactly as an uninterrupted run; a checkpoint of another model, tau,
  gate config or training data (label store paths, metadata hash, taus, window, cap) raises
  `CheckpointMismatchError`, an unreadable one `CheckpointCorruptError`, and neither touches
  the files on disk. Pruning keeps the `keep_checkpoints` latest steps of this run's own
  setup and data and never deletes another's.
- Non-finite values stop the run: the first NaN or infinite loss (or weights) raises
  `NonFiniteError` naming the step, before anything after the last good checkpoint is saved.
- train/distributed.py: multi-host runs (`init_distributed` before any other JAX call).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from smartkv_jax import gate_checkpoint as ckpt
from smartkv_jax import sharding as shd
from smartkv_jax.gates import GateConfig, Gates, init_gates, set_normalization
from smartkv_jax.jsonio import dumps

from .batches import ShardStream, batch_arrays, global_batch, normalization_stats, shard_rows
from .distributed import to_host
from .label_store import LabelStore, eval_rows, open_store
from .metrics import LOSSES, NonFiniteError, evaluate, summarize_r2
from .train_state import StateFns, TrainState

SINKS = 4  # R² is reported with all uncensored keys and without the first SINKS positions


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Gate training run. Printed into every checkpoint's metadata and the final summary.

    tau: labelling threshold whose lifespans are the targets (must be in the store's taus).
    lr, weight_decay, warmup, final_lr_frac: AdamW on a warmup-cosine schedule from 0 to lr
        and down to lr * final_lr_frac at `steps`; weight decay on weight matrices only.
    loss: "mse" | "huber" | "censored" (train/metrics.py); huber_delta in label stds.
    exclude_sinks: leave the first this many positions of every window out of training.
    data_shards: fixed number of sampling shards (batch_size and the process count must
        divide into it; results do not depend on the device or process count).
    eval_every / ckpt_every: steps between held-out R² and between checkpoints (0: only at
        the end). keep_checkpoints: how many recent checkpoints orbax keeps (0: all).
    eval_max_rows: evaluate on at most this many held-out keys during training, evenly
        spaced (0: all); the final evaluation always uses all of them.

    Defaults were tuned on SmolLM2-135M labels (4 books x 2 windows of 2048 tokens, 8192
    uncensored keys; held out: pg11, pg16), where the gates overfit: strong decoupled weight
    decay (2.0) and ~100 epochs (800 steps of 1024) gave median R² 0.564 at tau 0.05 against
    0.53 for wd 0.01 / 1000 steps; hidden 64 and more steps only pay with more data (24
    windows: 0.58 with hidden 64, wd 0.5, 2500 steps; 48 windows: 0.594 and 86 windows: 0.603
    with 4000 steps).
    """

    tau: float = 0.05
    lr: float = 5e-3
    weight_decay: float = 2.0
    steps: int = 800
    batch_size: int = 1024
    warmup: int = 50
    final_lr_frac: float = 0.02
    loss: str = "mse"
    huber_delta: float = 1.0
    eval_every: int = 200
    ckpt_every: int = 200
    keep_checkpoints: int = 3
    seed: int = 0
    exclude_sinks: int = 0
    data_shards: int = 8
    eval_batch: int = 4096
    eval_max_rows: int = 0
    stats_rows: int = 65536
    log_every: int = 10

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; known: {', '.join(LOSSES)}")
        if self.steps < 1 or self.batch_size < 1 or self.data_shards < 1:
            raise ValueError("steps, batch_size and data_shards must be >= 1")
        if self.batch_size % self.data_shards:
            raise ValueError(
                f"batch_size={self.batch_size} must be a multiple of data_shards={self.data_shards}"
            )
        if self.lr <= 0 or self.weight_decay < 0 or self.warmup < 0:
            raise ValueError("need lr > 0, weight_decay >= 0 and warmup >= 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class _Plan:
    """What a run derives from its stores, config and mesh before the first step: the flat
    head count G padded to g_pad, this process's data shards and its slice of the heads."""

    cfg: TrainConfig
    gate: GateConfig
    train: LabelStore
    held: LabelStore | None
    mesh: Any
    g_pad: int
    tau_i: int
    rows_by_shard: list[np.ndarray]
    my_shards: list[int]
    heads: tuple[int, int]  # [start, stop) of the flat heads this process feeds

    @property
    def per_shard(self) -> int:
        """Rows each shard contributes to a global batch."""
        return self.cfg.batch_size // self.cfg.data_shards

    def head_weights(self) -> np.ndarray:
        """[g_pad] loss weight per flat head: 1, and 0 for the padding heads."""
        w = np.zeros(self.g_pad, np.float32)
        w[: self.gate.num_heads] = 1.0
        return w


def _open_stores(train_store, eval_store, cfg: TrainConfig, gate: GateConfig | None):
    """(train store, held-out store or None, gate config), checked against each other."""
    train = open_store(train_store)
    held = open_store(eval_store) if eval_store is not None else None
    nl, nk, d = train.shape
    gate = gate or GateConfig(num_layers=nl, num_kv_heads=nk, head_dim=d)
    if (gate.num_layers, gate.num_kv_heads, gate.head_dim) != (nl, nk, d):
        raise ValueError(f"gate config is for {gate} but the store holds (L, K, D)={train.shape}")
    if held is not None and held.shape != train.shape:
        raise ValueError(f"eval store holds {held.shape}, train store {train.shape}")
    train.tau_index(cfg.tau)
    if held is not None:
        held.tau_index(cfg.tau)
    return train, held, gate


def _plan(train, held, cfg: TrainConfig, gate: GateConfig, mesh) -> _Plan:
    """The run's padded head count, trainable rows in shards, and this process's share."""
    n_data = shd.mesh_shape(mesh)[0]
    if cfg.batch_size % n_data:
        raise ValueError(f"batch_size={cfg.batch_size} is not a multiple of data={n_data}")
    if cfg.data_shards % jax.process_count():
        raise ValueError(
            f"data_shards={cfg.data_shards} must be a multiple of the "
            f"{jax.process_count()} processes"
        )
    g_pad = shd.padded_heads(gate.num_heads, mesh)
    ok = train.pos_N >= cfg.exclude_sinks
    if cfg.loss != "censored":
        ok &= ~train.censored_N
    per_shard = cfg.batch_size // cfg.data_shards
    r0, r1 = shd.process_row_range(mesh, cfg.batch_size)
    if r0 % per_shard or r1 % per_shard:
        raise ValueError(
            f"this process feeds batch rows [{r0}, {r1}), not whole data shards of "
            f"{per_shard} rows: choose data_shards so that each process owns whole shards"
        )
    heads = shd.process_index_range(
        shd.batch_heads_sharding(mesh, 3), (cfg.batch_size, g_pad, gate.head_dim), 1
    )
    return _Plan(
        cfg=cfg,
        gate=gate,
        train=train,
        held=held,
        mesh=mesh,
        g_pad=g_pad,
        tau_i=train.tau_index(cfg.tau),
        rows_by_shard=shard_rows(np.flatnonzero(ok), cfg.data_shards),
        my_shards=list(range(r0 // per_shard, r1 // per_shard)),
        heads=heads,
    )


def data_identity(train: LabelStore) -> dict[str, Any]:
    """What identifies a run's training data in its checkpoints: the label store paths, the
    sha256 of their metadata, rows, taus, window and cap."""
    return {
        "train": [str(p.absolute()) for p in train.paths],
        "metadata_sha256": hashlib.sha256(dumps(train.meta, sort_keys=True).encode()).hexdigest(),
        "rows": train.num_rows,
        "taus": [float(t) for t in train.meta["taus"]],
        "window": train.meta.get("window"),
        "cap": train.cap,
    }


def _expected_meta(plan: _Plan) -> dict[str, Any]:
    """The checkpoint metadata that identifies this run's setup and training data."""
    train, held, cfg = plan.train, plan.held, plan.cfg
    return {
        "format": ckpt.CKPT_FORMAT,
        "model": train.meta["model"],
        "tau": float(cfg.tau),
        "gate_config": plan.gate.to_dict(),
        "store_shape": list(train.shape),
        "train_config": cfg.to_dict(),
        "data": data_identity(train),
        "label_store": {
            "train": train.path_record(),
            "eval": None if held is None else held.path_record(),
            "train_sources": train.meta.get("sources"),
            "eval_sources": None if held is None else held.meta.get("sources"),
            "window": train.meta.get("window"),
            "cap": train.cap,
        },
    }


def _initial_gates(plan: _Plan) -> Gates:
    """Fresh gates (leaves [L, K, ...] on the host) with the training data's statistics;
    NonFiniteError if those are not finite (the store holds NaN or infinite keys)."""
    cfg = plan.cfg
    stats = normalization_stats(
        plan.train,
        plan.rows_by_shard,
        plan.my_shards,
        plan.tau_i,
        plan.gate.pair_norms,
        max(1, cfg.stats_rows // cfg.data_shards),
    )
    bad = sorted(name for name, x in stats.items() if not np.isfinite(x).all())
    if bad:
        raise NonFiniteError(
            f"label store {plan.train.name} holds NaN or infinite keys: its normalisation "
            f"statistics {', '.join(bad)} are not finite. Nothing was trained or saved."
        )
    gates = set_normalization(init_gates(plan.gate, jax.random.key(cfg.seed)), stats)
    return jax.tree.map(np.asarray, gates)


class _Trainer:
    """One run's loop over global steps, with its checkpoints and history (see
    `train_gates` for the history's fields)."""

    def __init__(self, plan: _Plan, manager, where: str):
        self.plan, self.manager, self.where = plan, manager, where
        self.fns = StateFns(plan.cfg, plan.gate, plan.mesh, plan.g_pad, plan.head_weights())
        self.meta = _expected_meta(plan)
        self.history: dict[str, Any] = {"loss": [], "eval": [], "summary": None}
        self.eval_fns: dict = {}
        self.streams = [
            ShardStream(plan.rows_by_shard[s], plan.cfg.seed, s) for s in plan.my_shards
        ]
        self.held_rows = None if plan.held is None else eval_rows(plan.held, plan.cfg.eval_max_rows)
        self.held_rows_all = None if plan.held is None else eval_rows(plan.held)
        self.pending: list[tuple[int, jax.Array]] = []  # (step, loss) not yet checked
        self.ours: dict[int, bool] = {}  # checkpoint step -> of this run's setup and data
        self.state = self._start()

    def _start(self) -> TrainState:
        """A fresh state, or the latest checkpoint's after checking it fits this run."""
        latest = self.manager.latest_step() if self.manager is not None else None
        self.history["resumed_from"] = latest
        if latest is None:
            return self.fns.fresh(_initial_gates(self.plan))
        saved = ckpt.read_metadata(self.manager, latest, self.where)
        ckpt.check_compatible(saved, self.meta, latest, self.where)
        restored = ckpt.restore_state(self.manager, latest, self.fns.canon_abstract, self.where)
        host_params = jax.tree.map(to_host, restored["params"])
        same_step = int(to_host(restored["step"])) == int(latest)
        ckpt.check_finite(host_params, latest, self.where)
        ckpt.verify_checksum(host_params, saved, latest, self.where, ok=same_step)
        self.history["loss"] = list(saved.get("history", {}).get("loss", []))
        self.history["eval"] = list(saved.get("history", {}).get("eval", []))
        return self.fns.from_canonical(restored)

    def _batch(self, step: int) -> dict[str, jax.Array]:
        """Global batch `step`, built from this process's rows of it (in shard order)."""
        plan = self.plan
        n = plan.per_shard
        local = np.concatenate([st.take(step * n, n) for st in self.streams])
        arrays = batch_arrays(plan.train, local, plan.tau_i, plan.g_pad, plan.heads)
        return global_batch(arrays, plan.mesh, plan.cfg.batch_size, plan.g_pad, plan.gate.head_dim)

    def _evaluate(self, rows: np.ndarray) -> dict[int, np.ndarray]:
        """R² per flat head on held-out `rows`, with all keys (0) and without the sinks."""
        plan = self.plan
        return evaluate(
            self.fns.gates(self.state),
            plan.held,
            plan.cfg.tau,
            rows,
            plan.mesh,
            (0, SINKS),
            plan.cfg.eval_batch,
            self.eval_fns,
        )

    def _record_eval(self, step: int) -> str:
        self._check_losses()
        r2 = self._evaluate(self.held_rows)
        rec = {
            "step": step,
            "median_r2": float(np.nanmedian(r2[0])),
            "median_r2_nosink": float(np.nanmedian(r2[SINKS])),
        }
        self.history["eval"].append(rec)
        return f"{rec['median_r2']:.3f}"

    def save(self, step: int) -> None:
        """Checkpoint `step` (unless there is one) once its losses and weights are finite,
        then prune this run's older checkpoints."""
        if self.manager is None or step in self.manager.all_steps():
            return
        self._check_losses()
        canon = self.fns.to_canonical(self.state)
        sums = ckpt.checksum(jax.tree.map(to_host, canon["params"]))
        if not all(math.isfinite(x) for x in sums):
            raise self._diverged(step, "the gates' weights are not finite")
        meta = dict(self.meta)
        meta.update(
            step=step,
            checksum=sums,
            history={"loss": self.history["loss"], "eval": self.history["eval"]},
            saved_unix_time=time.time(),
        )
        ckpt.save_state(self.manager, step, canon, meta)
        self.ours[step] = True
        ckpt.prune(self.manager, self.plan.cfg.keep_checkpoints, self._is_ours)

    def _is_ours(self, step: int) -> bool:
        if step not in self.ours:
            self.ours[step] = ckpt.belongs(self.manager, step, self.meta, self.where)
        return self.ours[step]

    def _check_losses(self) -> float | None:
        """The latest loss, after checking every loss since the last check (NonFiniteError
        at the first one that is NaN or infinite)."""
        losses = [(s, float(to_host(x))) for s, x in self.pending]
        self.pending = []
        for s, x in losses:
            if not math.isfinite(x):
                raise self._diverged(s, f"its loss is {x}")
        return losses[-1][1] if losses else None

    def _diverged(self, step: int, what: str) -> NonFiniteError:
        last = self.manager.latest_step() if self.manager is not None else None
        kept = (
            f"The last good checkpoint, step {last} in {self.where}, is kept; nothing after "
            "it was saved."
            if last is not None
            else "No checkpoint was saved."
        )
        return NonFiniteError(
            f"training stopped at step {step}: {what}. The label store {self.plan.train.name} "
            f"may hold NaN or infinite keys, or the learning rate ({self.plan.cfg.lr}) is too "
            f"high. {kept}"
        )

    def run(self, end: int, progress: bool) -> None:
        """Steps from the state's step to `end`, logging, evaluating and checkpointing."""
        from tqdm import tqdm

        cfg = self.plan.cfg
        start = int(to_host(self.state.step))
        show = progress and jax.process_index() == 0
        bar = tqdm(total=cfg.steps, initial=start, desc="train-gates", disable=not show)
        postfix: dict[str, str] = {}
        for step in range(start, end):
            self.state, loss = self.fns.train_step(self.state, self._batch(step))
            done = step + 1
            self.pending.append((done, loss))
            if done % cfg.log_every == 0 or done == end:
                self.history["loss"].append([done, self._check_losses()])
                postfix["loss"] = f"{self.history['loss'][-1][1]:.4f}"
            if self.plan.held is not None and cfg.eval_every and done % cfg.eval_every == 0:
                postfix["R2"] = self._record_eval(done)
            if cfg.ckpt_every and done % cfg.ckpt_every == 0:
                self.save(done)
            bar.set_postfix(postfix, refresh=False)
            bar.update(1)
        bar.close()
        self.save(end if start < end else start)

    def result(self, end: int) -> Gates:
        """The gates (host leaves [L, K, ...]); the held-out summary once all steps ran."""
        plan = self.plan
        canon = self.fns.to_canonical(self.state)
        gates = Gates.from_state(plan.gate, jax.tree.map(to_host, canon["params"]))
        if plan.held is not None and end == plan.cfg.steps:
            r2 = self._evaluate(self.held_rows_all)
            lk = (plan.gate.num_layers, plan.gate.num_kv_heads)
            self.history["summary"] = {
                "tau": plan.cfg.tau,
                "steps": end,
                "eval_keys": int(len(self.held_rows_all)),
                **summarize_r2(r2[0].reshape(lk)),
                "nosink": summarize_r2(r2[SINKS].reshape(lk)),
            }
        return gates


def train_gates(
    train_store: str | Path | LabelStore,
    eval_store: str | Path | LabelStore | None,
    cfg: TrainConfig,
    ckpt_dir: str | Path | None,
    mesh=None,
    *,
    gate: GateConfig | None = None,
    stop_after: int | None = None,
    progress: bool = True,
) -> tuple[Gates, dict[str, Any]]:
    """Train gates for every (layer, KV head) of the store's model; returns (gates with host
    leaves [L, K, ...], history).

    gate: gate shape and features (default: GateConfig with the store's L, K, D).
    mesh: ("data", "model") mesh (default `make_mesh()` over all devices).
    ckpt_dir: orbax checkpoint directory (None: no checkpoints). A run resumes from its latest
        step. stop_after: stop (and checkpoint) once this global step is reached, as if the run
        had been killed there.
    history: {"loss": [[step, loss]...], "eval": [{step, median_r2, median_r2_nosink}...],
    "summary": final R² summary on the eval store (or None), "resumed_from": step or None,
    "seconds": wall time}.
    Raises CheckpointMismatchError / CheckpointCorruptError for a checkpoint of another run
    or a damaged one, NonFiniteError at the first NaN or infinite loss.
    """
    t0 = time.perf_counter()
    train, held, gate = _open_stores(train_store, eval_store, cfg, gate)
    plan = _plan(train, held, cfg, gate, mesh or shd.make_mesh())
    manager = ckpt.open_manager(ckpt_dir) if ckpt_dir is not None else None  # run prunes
    try:
        trainer = _Trainer(plan, manager, str(ckpt_dir))
        end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
        trainer.run(end, progress)
        gates = trainer.result(end)
    finally:
        if manager is not None:
            manager.close()
    trainer.history["seconds"] = time.perf_counter() - t0
    return gates, trainer.history

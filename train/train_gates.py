"""Train the lifespan gates on a label store (DESIGN.md: gate, label, censoring, R²).

    smartkv train-gates --train labels/train --eval labels/test --tau 0.05 --ckpt-dir ckpt/gates

Pieces, in the order the trainer uses them:

- `open_store`: a label store (metadata.json + a `datasets` Arrow table in data/, written by
  train/labels.py) as memory-mapped numpy arrays, or several stores of the same model and
  labelling settings (say disjoint window ranges of `smartkv labels --first-window`) as one.
- Sampling: the trainable rows are dealt round-robin into `data_shards` fixed shards; every
  shard has its own seeded stream of epoch permutations, and a global batch is the
  concatenation of `batch_size / data_shards` rows from each shard in shard order. A batch is
  therefore a pure function of (seed, step), the same for any number of devices or processes,
  and a process reads only the shards whose rows land on its devices.
- Normalisation statistics (key mean/std per head, log-norm, label mean/std) from per-shard
  float64 sums, gathered across processes and summed in shard order.
- `jax.jit` train and eval steps with explicit in/out shardings on a ("data", "model") mesh:
  batch rows over "data", the flattened head axis G = L*K over "model" (padded to a multiple
  of the model size, see smartkv_jax/sharding.py). Optimiser: AdamW on a warmup-cosine
  schedule; the normalisation leaves are frozen.
- Orbax checkpoints every `ckpt_every` steps. The state is saved in the device-independent
  [L, K, ...] layout, next to a JSON metadata item (model, tau, gate config, label stores,
  train config, history, parameter checksum). A restart resumes from the latest step and
  continues exactly as an uninterrupted run; a checkpoint of another model, tau or gate
  config raises `CheckpointMismatchError`, an unreadable one `CheckpointCorruptError`, and
  neither touches the files on disk.

Losses (all on labels standardised per head by the training label std, so every head counts
the same): "mse"; "huber" (delta in std units); "censored": uncensored keys as mse, and keys
whose label is only a lower bound (right-censored rows near the end of a window, and
lifespans clipped at the cap) pay only for predictions below that bound. "mse" and "huber"
train on uncensored rows only.

Multi-host: launch one process per host with --num-processes/--process-id/--coordinator
(or --distributed auto on a managed cluster); `init_distributed` must run before any other
JAX call. On CPU the collectives go through gloo.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from smartkv_jax import sharding as shd
from smartkv_jax.gates import (
    GateConfig,
    Gates,
    apply_heads,
    flatten_heads,
    init_gates,
    log_pair_norms,
    set_normalization,
    unflatten_heads,
)

LOSSES = ("mse", "huber", "censored")
CKPT_FORMAT = "smartkv-gates/1"
SINKS = 4  # R² is reported with all uncensored keys and without the first SINKS positions


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Gate training run. Printed into every checkpoint's metadata and the final summary.

    tau: labelling threshold whose lifespans are the targets (must be in the store's taus).
    lr, weight_decay, warmup, final_lr_frac: AdamW on a warmup-cosine schedule from 0 to lr
        and down to lr * final_lr_frac at `steps`; weight decay on weight matrices only.
    loss: "mse" | "huber" | "censored" (see the module docstring); huber_delta in label stds.
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


# ----------------------------------------------------------------------------- label store


@dataclasses.dataclass
class LabelStore:
    """A label store opened for reading. Arrays view the Arrow files (memory-mapped) when
    possible, so opening a large store costs no memory until rows are read. A store joined
    from several (`open_store([a, b])`) holds their rows in order, in memory."""

    paths: tuple[Path, ...]
    meta: dict[str, Any]
    keys_NLKD: np.ndarray  # float32 [N, L, K, D] pre-RoPE keys
    lifespan_NTLK: np.ndarray  # int32 [N, n_taus, L, K] lifespans clipped at cap
    censored_N: np.ndarray  # bool [N]: lifespan only a lower bound
    pos_N: np.ndarray  # int32 [N] position within the window

    @property
    def name(self) -> str:
        return " + ".join(str(p) for p in self.paths)

    def path_record(self) -> str | list[str]:
        """Absolute path(s) for checkpoint metadata: a string for one store, else a list."""
        full = [str(p.absolute()) for p in self.paths]
        return full[0] if len(full) == 1 else full

    @property
    def num_rows(self) -> int:
        return int(self.pos_N.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        """(L, K, D)."""
        return tuple(int(x) for x in self.keys_NLKD.shape[1:])  # type: ignore[return-value]

    @property
    def cap(self) -> int:
        return int(self.meta["cap"])

    def tau_index(self, tau: float) -> int:
        """Index of `tau` in the store's taus; raises ValueError naming the available ones."""
        taus = [float(t) for t in self.meta["taus"]]
        for i, t in enumerate(taus):
            if abs(t - tau) < 1e-9:
                return i
        raise ValueError(f"tau {tau} is not in label store {self.name} (it has taus {taus})")

    def labels(self, tau: float, rows: np.ndarray | None = None) -> np.ndarray:
        """y_nLK = log4(1 + lifespan) (float32) at `tau` for `rows` (default: all)."""
        ti = self.tau_index(tau)
        life = self.lifespan_NTLK[:, ti] if rows is None else self.lifespan_NTLK[rows, ti]
        return label_of(life)


def label_of(lifespan: np.ndarray) -> np.ndarray:
    """y = log4(1 + L) as float32."""
    return (np.log1p(np.asarray(lifespan, np.float64)) / np.log(4.0)).astype(np.float32)


def _arrow_column(ds, name: str, inner_shape: tuple[int, ...], dtype) -> np.ndarray:
    """Column `name` of a datasets.Dataset as a numpy array [N, *inner_shape], zero-copy from
    the Arrow buffers where the layout allows it."""
    import pyarrow as pa

    n = len(ds)
    if getattr(ds, "_indices", None) is None:
        parts = []
        for chunk in ds.data.table.column(name).chunks:
            arr = chunk.storage if isinstance(chunk, pa.ExtensionArray) else chunk
            while (
                pa.types.is_list(arr.type)
                or pa.types.is_large_list(arr.type)
                or (pa.types.is_fixed_size_list(arr.type))
            ):
                arr = arr.flatten()
            parts.append(arr.to_numpy(zero_copy_only=False))
        flat = parts[0] if len(parts) == 1 else np.concatenate(parts)
    else:  # a selected/shuffled view: let datasets materialise it
        flat = np.asarray(ds.with_format("numpy")[name]).reshape(-1)
    want = n * int(np.prod(inner_shape, dtype=np.int64))
    if flat.size != want:
        raise ValueError(
            f"column {name!r} holds {flat.size} values, expected {n} rows x {inner_shape}"
        )
    return flat.astype(dtype, copy=False).reshape(n, *inner_shape)


_JOIN_FIELDS = ("model", "taus", "cap", "window", "num_layers", "num_kv_heads", "head_dim")


def open_store(
    path: str | Path | LabelStore | Sequence[str | Path],
    in_memory: bool | None = None,
    max_memory_gb: float = 4.0,
) -> LabelStore:
    """Open a label store directory (metadata.json + data/). A LabelStore passes through; a
    list of directories is joined into one store (same model, taus, cap, window and shapes;
    no window labelled twice).

    in_memory: copy the arrays into RAM (faster random batches than reading the memory-mapped
    Arrow files); None: only when the keys take at most `max_memory_gb` GiB.
    """
    if isinstance(path, LabelStore):
        return path
    if not isinstance(path, (str, Path)):
        paths = list(path)
        if len(paths) == 1:
            return open_store(paths[0], in_memory, max_memory_gb)
        return _join_stores([open_store(p, in_memory=False) for p in paths])
    import datasets

    path = Path(path)
    meta_file = path / "metadata.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path} is not a label store (no metadata.json)")
    meta = json.loads(meta_file.read_text())
    for field in ("model", "taus", "cap", "num_layers", "num_kv_heads", "head_dim"):
        if field not in meta:
            raise ValueError(f"label store {path}: metadata.json has no {field!r}")
    ds = datasets.load_from_disk(str(path / "data"))
    missing = {"key", "lifespan", "censored", "pos"} - set(ds.column_names)
    if missing:
        raise ValueError(f"label store {path}: data/ lacks columns {sorted(missing)}")
    nl, nk, d = int(meta["num_layers"]), int(meta["num_kv_heads"]), int(meta["head_dim"])
    store = LabelStore(
        paths=(path,),
        meta=meta,
        keys_NLKD=_arrow_column(ds, "key", (nl, nk, d), np.float32),
        lifespan_NTLK=_arrow_column(ds, "lifespan", (len(meta["taus"]), nl, nk), np.int32),
        censored_N=_arrow_column(ds, "censored", (), bool),
        pos_N=_arrow_column(ds, "pos", (), np.int32),
    )
    if in_memory is None:
        in_memory = store.keys_NLKD.nbytes <= max_memory_gb * 2**30
    if in_memory:
        store.keys_NLKD = np.array(store.keys_NLKD)
        store.lifespan_NTLK = np.array(store.lifespan_NTLK)
    return store


def _labelled_windows(store: LabelStore) -> set[tuple[str, int]]:
    """(doc, window) pairs of a single store, read from its doc/window columns."""
    import datasets

    ds = datasets.load_from_disk(str(store.paths[0] / "data")).select_columns(["doc", "window"])
    table = ds.data.table
    pairs = zip(table.column("doc").to_pylist(), table.column("window").to_pylist())
    return set(pairs)


def _join_stores(stores: list[LabelStore]) -> LabelStore:
    first = stores[0]
    seen: dict[tuple[str, int], str] = {}
    for s in stores:
        for field in _JOIN_FIELDS:
            if s.meta.get(field) != first.meta.get(field):
                raise ValueError(
                    f"cannot join label stores {first.name} and {s.name}: {field} differs "
                    f"({first.meta.get(field)!r} vs {s.meta.get(field)!r})"
                )
        for doc, w in sorted(_labelled_windows(s)):
            if (doc, w) in seen:
                raise ValueError(
                    f"cannot join label stores: window {w} of {doc} is in both {seen[doc, w]} "
                    f"and {s.name}"
                )
            seen[doc, w] = s.name
    meta = dict(first.meta)
    meta["sources"] = sorted({d for s in stores for d in s.meta.get("sources", [])})
    meta["n_windows"] = sum(int(s.meta.get("n_windows", 0)) for s in stores)
    return LabelStore(
        paths=tuple(p for s in stores for p in s.paths),
        meta=meta,
        keys_NLKD=np.concatenate([s.keys_NLKD for s in stores]),
        lifespan_NTLK=np.concatenate([s.lifespan_NTLK for s in stores]),
        censored_N=np.concatenate([s.censored_N for s in stores]),
        pos_N=np.concatenate([s.pos_N for s in stores]),
    )


# ----------------------------------------------------------------------------- sampling


def _shard_rows(rows: np.ndarray, n_shards: int) -> list[np.ndarray]:
    shards = [rows[s::n_shards] for s in range(n_shards)]
    if min(len(s) for s in shards) == 0:
        raise ValueError(f"only {len(rows)} trainable rows for {n_shards} data shards")
    return shards


class _ShardStream:
    """Rows [start, start+count) of shard s's endless stream of seeded epoch permutations."""

    def __init__(self, rows: np.ndarray, seed: int, shard: int):
        self.rows, self.seed, self.shard = rows, seed, shard
        self._cache: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            if len(self._cache) > 4:
                self._cache.pop(min(self._cache))
            rng = np.random.default_rng([self.seed, self.shard, epoch])
            self._cache[epoch] = self.rows[rng.permutation(len(self.rows))]
        return self._cache[epoch]

    def take(self, start: int, count: int) -> np.ndarray:
        n = len(self.rows)
        out = np.empty(count, np.int64)
        done = 0
        while done < count:
            epoch, off = divmod(start + done, n)
            k = min(count - done, n - off)
            out[done : done + k] = self._perm(epoch)[off : off + k]
            done += k
        return out


# ----------------------------------------------------------------------------- batches


def _batch_arrays(
    store: LabelStore,
    rows: np.ndarray,
    tau_i: int,
    g_pad: int,
    heads: tuple[int, int],
    weight: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Host arrays of one process-local batch: keys [n, g, D], y [n, g], lb [n, g] (label is a
    lower bound), pos [n], w [n] (row weight), for flat heads heads[0]:heads[1]."""
    n = len(rows)
    nl, nk, d = store.shape
    g = nl * nk
    h0, h1 = heads
    keys = np.zeros((n, g_pad, d), np.float32)
    keys[:, :g] = store.keys_NLKD[rows].reshape(n, g, d)
    life = np.zeros((n, g_pad), np.int32)
    life[:, :g] = store.lifespan_NTLK[rows, tau_i].reshape(n, g)
    lb = store.censored_N[rows][:, None] | (life >= store.cap)
    return {
        "keys": keys[:, h0:h1],
        "y": label_of(life)[:, h0:h1],
        "lb": lb[:, h0:h1],
        "pos": store.pos_N[rows].astype(np.int32),
        "w": np.ones(n, np.float32) if weight is None else weight.astype(np.float32),
    }


def _batch_shardings(mesh) -> dict[str, Any]:
    return {
        "keys": shd.batch_heads_sharding(mesh, 3),
        "y": shd.batch_heads_sharding(mesh, 2),
        "lb": shd.batch_heads_sharding(mesh, 2),
        "pos": shd.batch_sharding(mesh, 1),
        "w": shd.batch_sharding(mesh, 1),
    }


def _global_batch(local: dict[str, np.ndarray], mesh, rows: int, g_pad: int, d: int):
    sh = _batch_shardings(mesh)
    shapes = {
        "keys": (rows, g_pad, d),
        "y": (rows, g_pad),
        "lb": (rows, g_pad),
        "pos": (rows,),
        "w": (rows,),
    }
    return {k: shd.make_global(local[k], sh[k], shapes[k]) for k in sh}


def _to_host(x) -> np.ndarray:
    """Host copy of a (fully replicated or fully addressable) jax.Array."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


# ----------------------------------------------------------------------------- statistics


def _shard_sums(store: LabelStore, rows: np.ndarray, tau_i: int, pairing: str, chunk=4096):
    """Float64 sums over `rows` for the normalisation statistics, as one flat vector."""
    nl, nk, d = store.shape
    s_p = np.zeros((nl, nk, d // 2))
    s_p2 = np.zeros((nl, nk, d // 2))
    s_k = np.zeros((nl, nk, d))
    s_k2 = np.zeros((nl, nk, d))
    s_ln = np.zeros((nl, nk))
    s_ln2 = np.zeros((nl, nk))
    n_y = np.zeros((nl, nk))
    s_y = np.zeros((nl, nk))
    s_y2 = np.zeros((nl, nk))
    for i in range(0, len(rows), chunk):
        r = rows[i : i + chunk]
        k = store.keys_NLKD[r].astype(np.float64)
        s_k += k.sum(0)
        s_k2 += (k * k).sum(0)
        ln = 0.5 * np.log(np.sum(k * k, -1) + 1e-12)
        s_ln += ln.sum(0)
        s_ln2 += (ln * ln).sum(0)
        lp = log_pair_norms(k, pairing)
        s_p += lp.sum(0)
        s_p2 += (lp * lp).sum(0)
        life = store.lifespan_NTLK[r, tau_i]
        exact = ~(store.censored_N[r][:, None, None] | (life >= store.cap))
        y = label_of(life).astype(np.float64)
        n_y += exact.sum(0)
        s_y += (y * exact).sum(0)
        s_y2 += (y * y * exact).sum(0)
    parts = [np.array([len(rows)], np.float64), s_k, s_k2, s_ln, s_ln2, n_y, s_y, s_y2, s_p, s_p2]
    return np.concatenate([p.reshape(-1) for p in parts])


def _allgather_f64(x_SV: np.ndarray) -> np.ndarray:
    """[P, S, V] float64 from every process's [S, V] (exact: travels as uint32 pairs)."""
    if jax.process_count() == 1:
        return x_SV[None]
    from jax.experimental import multihost_utils

    u = np.ascontiguousarray(x_SV).view(np.uint32)
    g = np.asarray(multihost_utils.process_allgather(u))
    return np.ascontiguousarray(g).view(np.float64)


def _stats_from_sums(total: np.ndarray, shape: tuple[int, int, int]) -> dict[str, np.ndarray]:
    nl, nk, d = shape
    sizes = [1, nl * nk * d, nl * nk * d] + [nl * nk] * 5 + [nl * nk * (d // 2)] * 2
    pieces = np.split(total, np.cumsum(sizes)[:-1])
    n, s_k, s_k2, s_ln, s_ln2, n_y, s_y, s_y2, s_p, s_p2 = pieces
    n = max(float(n[0]), 1.0)
    k_mu = s_k / n
    k_sd = np.sqrt(np.maximum(s_k2 / n - k_mu**2, 0.0)).reshape(nl, nk, d)
    k_sd = np.maximum(k_sd, 1e-3 * k_sd.mean(-1, keepdims=True) + 1e-8)
    ln_mu = s_ln / n
    ln_sd = np.sqrt(np.maximum(s_ln2 / n - ln_mu**2, 0.0))
    p_mu = s_p / n
    p_sd = np.sqrt(np.maximum(s_p2 / n - p_mu**2, 0.0))
    ny = np.maximum(n_y, 1.0)
    y_mu = s_y / ny
    y_sd = np.sqrt(np.maximum(s_y2 / ny - y_mu**2, 0.0))
    return {
        "key_mu": k_mu.reshape(nl, nk, d),
        "key_sigma": k_sd,
        "lognorm_mu": ln_mu.reshape(nl, nk),
        "lognorm_sigma": np.maximum(ln_sd, 1e-3).reshape(nl, nk),
        "pair_mu": p_mu.reshape(nl, nk, d // 2),
        "pair_sigma": np.maximum(p_sd, 1e-3).reshape(nl, nk, d // 2),
        "y_mu": y_mu.reshape(nl, nk),
        "y_sigma": np.maximum(y_sd, 0.1).reshape(nl, nk),
    }


# ----------------------------------------------------------------------------- steps


def make_optimizer(cfg: TrainConfig, params: Gates) -> optax.GradientTransformation:
    """AdamW (decay on w_in/w_out only) on a warmup-cosine schedule; `norm` frozen."""
    warmup = min(cfg.warmup, max(cfg.steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=warmup,
        decay_steps=max(cfg.steps, warmup + 1),
        end_value=cfg.lr * cfg.final_lr_frac,
    )

    def decay_mask(p):
        m = jax.tree.map(lambda _: False, p)
        return dataclasses.replace(
            m, w_in=None if p.w_in is None else True, w_out=True, b_out=False
        )

    adamw = optax.adamw(schedule, weight_decay=cfg.weight_decay, mask=decay_mask)
    labels = dataclasses.replace(
        jax.tree.map(lambda _: "train", params),
        norm={k: "frozen" for k in params.norm},
    )
    return optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()}, labels)


def _loss_fn(cfg: TrainConfig, head_w_G: jax.Array, params: Gates, batch) -> jax.Array:
    yhat_BG = apply_heads(params, batch["keys"], batch["pos"])
    scale_G = jax.lax.stop_gradient(params.norm["y_sigma"])
    r_BG = (yhat_BG - batch["y"]) / scale_G[None]
    if cfg.loss == "mse":
        per = r_BG**2
    elif cfg.loss == "huber":
        per = 2.0 * optax.huber_loss(r_BG, delta=cfg.huber_delta)
    else:  # censored: lower-bound labels pay only for predictions below the bound
        per = jnp.where(batch["lb"], jax.nn.relu(-r_BG) ** 2, r_BG**2)
    w_BG = batch["w"][:, None] * head_w_G[None, :]
    return jnp.sum(per * w_BG) / jnp.maximum(jnp.sum(w_BG), 1.0)


def _eval_sums(excludes: tuple[int, ...], params: Gates, batch) -> jax.Array:
    """[len(excludes), 4, G]: count, sum y, sum y², sum residual² per head, over rows with
    weight w and pos >= each entry of `excludes`."""
    yhat = apply_heads(params, batch["keys"], batch["pos"])
    y = batch["y"]
    res2 = (yhat - y) ** 2
    out = []
    for e in excludes:
        m = (batch["w"] * (batch["pos"] >= e))[:, None]
        out.append(
            jnp.stack(
                [
                    jnp.sum(m * jnp.ones_like(y), 0),
                    jnp.sum(m * y, 0),
                    jnp.sum(m * y * y, 0),
                    jnp.sum(m * res2, 0),
                ]
            )
        )
    return jnp.stack(out)


def _r2_from_sums(s: np.ndarray) -> np.ndarray:
    """R² per head from [4, G] float64 sums (nan where a head has no spread)."""
    n, sy, syy, sres = s
    with np.errstate(divide="ignore", invalid="ignore"):
        sstot = syy - sy * sy / np.maximum(n, 1)
        r2 = 1.0 - sres / sstot
    return np.where((n > 1) & (sstot > 1e-9), r2, np.nan)


def _evaluate(
    params_G: Gates,
    store: LabelStore,
    tau: float,
    rows: np.ndarray,
    mesh,
    excludes: tuple[int, ...],
    batch: int,
    fns: dict,
) -> dict[int, np.ndarray]:
    """R² per flat head (first L*K entries) on `rows`, for each minimum position in
    `excludes`. Each process feeds its own block of every chunk."""
    nl, nk, d = store.shape
    g = nl * nk
    g_pad = params_G.b_out.shape[0]
    data = shd.mesh_shape(mesh)[0]
    batch = -(-batch // data) * data
    r0, r1 = shd.process_row_range(mesh, batch)
    h = shd.process_index_range(shd.batch_heads_sharding(mesh, 3), (batch, g_pad, d), 1)
    key = ("eval", excludes)
    if key not in fns:
        fns[key] = jax.jit(
            lambda p, b: _eval_sums(excludes, p, b),
            in_shardings=(shd.gate_shardings(params_G, mesh), _batch_shardings(mesh)),
            out_shardings=shd.replicated(mesh),
        )
    tau_i = store.tau_index(tau)
    total = np.zeros((len(excludes), 4, g_pad))
    for c in range(0, max(len(rows), 1), batch):
        chunk = rows[c : c + batch]
        local = chunk[r0:r1]
        w = np.zeros(r1 - r0, np.float32)
        w[: len(local)] = 1.0
        padded = np.concatenate([local, np.full(r1 - r0 - len(local), rows[0])]).astype(int)
        arrays = _batch_arrays(store, padded, tau_i, g_pad, h, w)
        out = fns[key](params_G, _global_batch(arrays, mesh, batch, g_pad, d))
        total += _to_host(out).astype(np.float64)
    return {e: _r2_from_sums(total[i])[:g] for i, e in enumerate(excludes)}


def eval_rows(store: LabelStore, max_rows: int = 0) -> np.ndarray:
    """Uncensored rows of a store (evenly thinned to at most max_rows; 0: all)."""
    rows = np.flatnonzero(~store.censored_N)
    if len(rows) == 0:
        raise ValueError(f"label store {store.name} has no uncensored keys to evaluate on")
    if max_rows and len(rows) > max_rows:
        rows = rows[np.linspace(0, len(rows) - 1, max_rows).astype(int)]
    return rows


def r2_per_head(
    params: Gates,
    store: str | Path | LabelStore,
    tau: float,
    exclude_first: int = 0,
    *,
    mesh=None,
    batch: int = 4096,
) -> np.ndarray:
    """R²_LK of the gates on a store's uncensored keys at `tau`, leaving out positions
    < exclude_first (DESIGN.md: R²). params leaves [L, K, ...]. nan for a head whose labels
    do not vary."""
    store = open_store(store)
    want = (params.cfg.num_layers, params.cfg.num_kv_heads, params.cfg.head_dim)
    if store.shape != want:
        raise ValueError(f"gates are for (L, K, D)={want} but {store.name} holds {store.shape}")
    mesh = mesh or shd.make_mesh(devices=jax.local_devices())
    g_pad = shd.padded_heads(params.cfg.num_heads, mesh)
    flat = flatten_heads(jax.tree.map(np.asarray, params), pad_to=g_pad)
    flat = shd.shard_tree(flat, shd.gate_shardings(flat, mesh))
    r2 = _evaluate(flat, store, tau, eval_rows(store), mesh, (exclude_first,), batch, {})
    return r2[exclude_first].reshape(params.cfg.num_layers, params.cfg.num_kv_heads)


def summarize_r2(r2_LK: np.ndarray) -> dict[str, Any]:
    """Median R² overall and per layer, and the layer-0 heads."""
    r2_LK = np.asarray(r2_LK, np.float64)
    return {
        "median_r2": float(np.nanmedian(r2_LK)),
        "mean_r2": float(np.nanmean(r2_LK)),
        "per_layer_median_r2": [round(float(x), 4) for x in np.nanmedian(r2_LK, axis=1)],
        "layer0_r2": [round(float(x), 4) for x in r2_LK[0]],
        "r2_LK": [[round(float(x), 4) for x in row] for row in r2_LK],
    }


# ----------------------------------------------------------------------------- checkpoints


class CheckpointError(ValueError):
    """A gate checkpoint cannot be used; the files on disk are left as they are."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint belongs to another model, tau, gate config or store shape."""


class CheckpointCorruptError(CheckpointError):
    """The checkpoint's files cannot be read or fail their checksum."""


def _manager(ckpt_dir: str | Path, keep: int, read_only: bool = False):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep or None,
        create=not read_only,
        read_only=read_only,
        enable_async_checkpointing=False,
    )
    handlers = {"state": ocp.StandardCheckpointHandler(), "metadata": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(Path(ckpt_dir).absolute(), options=options, item_handlers=handlers)


def _checksum(params_state: dict) -> list[float]:
    """[sum, sum |x|] in float64 over all parameter leaves (host arrays)."""
    leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(params_state)]
    return [float(sum(x.sum() for x in leaves)), float(sum(np.abs(x).sum() for x in leaves))]


def _read_metadata(manager, step: int, where: str) -> dict:
    import orbax.checkpoint as ocp

    try:
        meta = manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))[
            "metadata"
        ]
    except Exception as err:  # noqa: BLE001 - any failure to read means a bad checkpoint
        raise CheckpointCorruptError(
            f"cannot read the metadata of checkpoint step {step} in {where}: "
            f"{type(err).__name__}: {err}. Nothing was deleted; move that step directory "
            "away to resume from an older one."
        ) from err
    if not isinstance(meta, dict) or meta.get("format") != CKPT_FORMAT:
        raise CheckpointCorruptError(
            f"checkpoint step {step} in {where} has no {CKPT_FORMAT} metadata "
            f"(got {type(meta).__name__}); it is not a gate checkpoint or it is damaged. "
            "Nothing was deleted."
        )
    return meta


def _check_compatible(saved: dict, expected: dict, step: int, where: str) -> None:
    problems = []
    if saved.get("model") != expected["model"]:
        problems.append(f"model {saved.get('model')!r} != {expected['model']!r}")
    if abs(float(saved.get("tau", math.nan)) - expected["tau"]) > 1e-9 or (
        saved.get("tau") is None
    ):
        problems.append(f"tau {saved.get('tau')} != {expected['tau']}")
    if saved.get("store_shape") != expected["store_shape"]:
        problems.append(
            f"(layers, kv heads, head dim) {saved.get('store_shape')} != {expected['store_shape']}"
        )
    sg, eg = saved.get("gate_config", {}), expected["gate_config"]
    diff = sorted(k for k in set(sg) | set(eg) if sg.get(k) != eg.get(k))
    if diff:
        problems.append(
            "gate config differs in "
            + ", ".join(f"{k}: {sg.get(k)!r} != {eg.get(k)!r}" for k in diff)
        )
    if problems:
        raise CheckpointMismatchError(
            f"checkpoint step {step} in {where} was trained for a different setup: "
            + "; ".join(problems)
            + ". Use another --ckpt-dir; the existing checkpoints were left untouched."
        )
    st, et = saved.get("train_config", {}), expected["train_config"]
    changed = sorted(k for k in et if k not in ("steps",) and st.get(k) != et.get(k))
    if changed and jax.process_index() == 0:
        warnings.warn(
            f"resuming {where} step {step} with changed train config: "
            + ", ".join(f"{k}: {st.get(k)!r} -> {et.get(k)!r}" for k in changed),
            stacklevel=3,
        )


def load_gates(ckpt_dir: str | Path, step: int | None = None) -> tuple[Gates, dict]:
    """(gates with host leaves [L, K, ...], metadata) from a training checkpoint directory
    (default: its latest step). Raises CheckpointError on a missing or damaged checkpoint."""
    where = str(ckpt_dir)
    if not Path(ckpt_dir).is_dir():
        raise FileNotFoundError(f"no gate checkpoint directory at {where}")
    absl_log = logging.getLogger("absl")
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)  # orbax warns that a read-only manager will not save
    try:
        manager = _manager(ckpt_dir, 0, read_only=True)
    finally:
        absl_log.setLevel(level)
    try:
        return _load_gates(manager, step, where)
    finally:
        manager.close()


def _load_gates(manager, step: int | None, where: str) -> tuple[Gates, dict]:
    import orbax.checkpoint as ocp

    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no gate checkpoints in {where}")
    meta = _read_metadata(manager, step, where)
    gate = GateConfig.from_dict(meta["gate_config"])
    try:
        tree = manager.item_metadata(step)["state"]
        dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev), tree
        )
        raw = manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        )
        params_state = jax.tree.map(np.asarray, raw["state"]["params"])
    except Exception as err:  # noqa: BLE001
        raise CheckpointCorruptError(
            f"cannot read the weights of checkpoint step {step} in {where}: "
            f"{type(err).__name__}: {err}. Nothing was deleted."
        ) from err
    if _checksum(params_state) != meta.get("checksum"):
        raise CheckpointCorruptError(
            f"checkpoint step {step} in {where} fails its checksum; nothing was deleted."
        )
    return Gates.from_state(gate, params_state), meta


# ----------------------------------------------------------------------------- training


def _canonical_fns(state_shape, mesh, nl: int, nk: int, g_pad: int):
    """Jitted converters between the training state (flat padded heads, sharded) and the
    checkpoint layout (leaves [L, K, ...], replicated): (to_canonical, from_canonical)."""
    g = nl * nk

    def per_head(path_leaf_ndim):
        return path_leaf_ndim >= 1

    def to_c(state):
        params = unflatten_heads(state["params"]).to_state()
        opt_leaves = jax.tree.leaves(state["opt"])
        opt = {
            str(i): (x[:g].reshape(nl, nk, *x.shape[1:]) if per_head(x.ndim) else x)
            for i, x in enumerate(opt_leaves)
        }
        return {"params": params, "opt": opt, "step": state["step"]}

    opt_def = jax.tree.structure(state_shape["opt"])
    cfg = state_shape["params"].cfg

    def from_c(c):
        gates = flatten_heads(Gates.from_state(cfg, c["params"]), pad_to=g_pad)

        def pad0(x):  # optimiser moments of padding heads start at zero
            x = x.reshape(g, *x.shape[2:])
            return jnp.concatenate([x, jnp.zeros((g_pad - g, *x.shape[1:]), x.dtype)])

        opt = [
            pad0(c["opt"][str(i)]) if c["opt"][str(i)].ndim >= 2 else c["opt"][str(i)]
            for i in range(len(c["opt"]))
        ]
        return {"params": gates, "opt": jax.tree.unflatten(opt_def, opt), "step": c["step"]}

    state_sh = jax.tree.map(lambda a: shd.heads_sharding(mesh, a.ndim), state_shape)
    canon_shape = jax.eval_shape(to_c, state_shape)
    repl = jax.tree.map(lambda _: shd.replicated(mesh), canon_shape)
    to_canonical = jax.jit(to_c, in_shardings=(state_sh,), out_shardings=repl)
    from_canonical = jax.jit(from_c, in_shardings=(repl,), out_shardings=state_sh)
    return to_canonical, from_canonical, canon_shape, repl


def _initial_params(train: LabelStore, rows_by_shard, my_shards, tau_i, gate, cfg) -> Gates:
    per_shard = max(1, cfg.stats_rows // cfg.data_shards)
    sums = []
    for s in my_shards:
        rows = rows_by_shard[s]
        if len(rows) > per_shard:
            rows = rows[np.linspace(0, len(rows) - 1, per_shard).astype(int)]
        sums.append(_shard_sums(train, np.sort(rows), tau_i, gate.pair_norms))
    gathered = _allgather_f64(np.stack(sums))  # [P, S_local, V] in process order
    total = np.zeros(gathered.shape[-1])
    for row in gathered.reshape(-1, gathered.shape[-1]):  # shard order, same for any P
        total += row
    stats = _stats_from_sums(total, train.shape)
    params = init_gates(gate, jax.random.key(cfg.seed))
    return jax.tree.map(np.asarray, set_normalization(params, stats))


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
    "summary": final R² summary on the eval store (or None), "resumed_from": step or None}.
    """
    import orbax.checkpoint as ocp
    from tqdm import tqdm

    t0 = time.perf_counter()
    train = open_store(train_store)
    held = open_store(eval_store) if eval_store is not None else None
    nl, nk, d = train.shape
    gate = gate or GateConfig(num_layers=nl, num_kv_heads=nk, head_dim=d)
    if (gate.num_layers, gate.num_kv_heads, gate.head_dim) != (nl, nk, d):
        raise ValueError(f"gate config is for {gate} but the store holds (L, K, D)={train.shape}")
    if held is not None and held.shape != train.shape:
        raise ValueError(f"eval store holds {held.shape}, train store {train.shape}")
    tau_i = train.tau_index(cfg.tau)
    if held is not None:
        held.tau_index(cfg.tau)

    mesh = mesh or shd.make_mesh()
    n_data = shd.mesh_shape(mesh)[0]
    if cfg.batch_size % n_data:
        raise ValueError(f"batch_size={cfg.batch_size} is not a multiple of data={n_data}")
    if cfg.data_shards % jax.process_count():
        raise ValueError(
            f"data_shards={cfg.data_shards} must be a multiple of the "
            f"{jax.process_count()} processes"
        )
    g = nl * nk
    g_pad = shd.padded_heads(g, mesh)
    head_w = np.zeros(g_pad, np.float32)
    head_w[:g] = 1.0

    # -- this process's shards and rows of every global batch
    ok = train.pos_N >= cfg.exclude_sinks
    if cfg.loss != "censored":
        ok &= ~train.censored_N
    rows_by_shard = _shard_rows(np.flatnonzero(ok), cfg.data_shards)
    per_shard = cfg.batch_size // cfg.data_shards
    r0, r1 = shd.process_row_range(mesh, cfg.batch_size)
    if r0 % per_shard or r1 % per_shard:
        raise ValueError(
            f"this process feeds batch rows [{r0}, {r1}), not whole data shards of "
            f"{per_shard} rows: choose data_shards so that each process owns whole shards"
        )
    my_shards = list(range(r0 // per_shard, r1 // per_shard))
    streams = [_ShardStream(rows_by_shard[s], cfg.seed, s) for s in my_shards]
    heads = shd.process_index_range(
        shd.batch_heads_sharding(mesh, 3), (cfg.batch_size, g_pad, d), 1
    )
    held_rows = eval_rows(held, cfg.eval_max_rows) if held is not None else None
    held_rows_all = eval_rows(held) if held is not None else None

    # -- state: fresh or from the latest checkpoint
    expected_meta = {
        "format": CKPT_FORMAT,
        "model": train.meta["model"],
        "tau": float(cfg.tau),
        "gate_config": gate.to_dict(),
        "store_shape": [nl, nk, d],
        "train_config": cfg.to_dict(),
        "label_store": {
            "train": train.path_record(),
            "eval": None if held is None else held.path_record(),
            "train_sources": train.meta.get("sources"),
            "eval_sources": None if held is None else held.meta.get("sources"),
            "window": train.meta.get("window"),
            "cap": train.cap,
        },
    }
    manager = _manager(ckpt_dir, cfg.keep_checkpoints) if ckpt_dir is not None else None
    try:
        latest = manager.latest_step() if manager is not None else None
        saved_meta = None
        if latest is not None:
            saved_meta = _read_metadata(manager, latest, str(ckpt_dir))
            _check_compatible(saved_meta, expected_meta, latest, str(ckpt_dir))

        template = flatten_heads(init_gates(gate, jax.random.key(0)), pad_to=g_pad)
        tx = make_optimizer(cfg, template)
        state_shape = jax.eval_shape(
            lambda p: {"params": p, "opt": tx.init(p), "step": jnp.zeros((), jnp.int32)}, template
        )
        state_sh = jax.tree.map(lambda a: shd.heads_sharding(mesh, a.ndim), state_shape)
        to_canonical, from_canonical, canon_shape, canon_sh = _canonical_fns(
            state_shape, mesh, nl, nk, g_pad
        )

        history: dict[str, Any] = {"loss": [], "eval": [], "summary": None, "resumed_from": latest}
        if latest is None:
            params0 = _initial_params(train, rows_by_shard, my_shards, tau_i, gate, cfg)
            flat0 = flatten_heads(params0, pad_to=g_pad)
            flat0 = shd.shard_tree(flat0, shd.gate_shardings(flat0, mesh))
            init = jax.jit(
                lambda p: {"params": p, "opt": tx.init(p), "step": jnp.zeros((), jnp.int32)},
                in_shardings=(state_sh["params"],),
                out_shardings=state_sh,
            )
            state = init(flat0)
        else:
            abstract = jax.tree.map(
                lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                canon_shape,
                canon_sh,
            )
            try:
                restored = manager.restore(
                    latest, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
                )["state"]
                host_params = jax.tree.map(_to_host, restored["params"])
            except Exception as err:  # noqa: BLE001
                raise CheckpointCorruptError(
                    f"cannot restore checkpoint step {latest} in {ckpt_dir}: "
                    f"{type(err).__name__}: {err}. Nothing was deleted; move that step directory "
                    "away to resume from an older one."
                ) from err
            if _checksum(host_params) != saved_meta.get("checksum") or int(
                _to_host(restored["step"])
            ) != int(latest):
                raise CheckpointCorruptError(
                    f"checkpoint step {latest} in {ckpt_dir} fails its checksum (its weights "
                    "are damaged). Nothing was deleted; move that step directory away to resume "
                    "from an older one."
                )
            state = from_canonical(restored)
            history["loss"] = list(saved_meta.get("history", {}).get("loss", []))
            history["eval"] = list(saved_meta.get("history", {}).get("eval", []))

        fns: dict = {}
        step_fn = jax.jit(
            lambda s, b: _train_step(cfg, tx, jnp.asarray(head_w), s, b),
            in_shardings=(state_sh, _batch_shardings(mesh)),
            out_shardings=(state_sh, shd.replicated(mesh)),
            donate_argnums=(0,),
        )

        def save(step: int) -> None:
            if manager is None or step in manager.all_steps():
                return
            canon = to_canonical(state)
            meta = dict(expected_meta)
            meta.update(
                step=step,
                checksum=_checksum(jax.tree.map(_to_host, canon["params"])),
                history={"loss": history["loss"], "eval": history["eval"]},
                saved_unix_time=time.time(),
            )
            manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(canon), metadata=ocp.args.JsonSave(meta)
                ),
            )
            manager.wait_until_finished()

        def evaluate(rows) -> dict[int, np.ndarray]:
            return _evaluate(
                state["params"], held, cfg.tau, rows, mesh, (0, SINKS), cfg.eval_batch, fns
            )

        start = int(_to_host(state["step"]))
        end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
        is_main = jax.process_index() == 0
        bar = tqdm(
            total=cfg.steps, initial=start, desc="train-gates", disable=not (progress and is_main)
        )
        postfix: dict[str, str] = {}
        for step in range(start, end):
            local = np.concatenate(
                [st.take(step * per_shard, per_shard) for st in streams]
            )  # this process's rows of global batch `step`, in shard order
            batch = _global_batch(
                _batch_arrays(train, local, tau_i, g_pad, heads), mesh, cfg.batch_size, g_pad, d
            )
            state, loss = step_fn(state, batch)
            done = step + 1
            if done % cfg.log_every == 0 or done == end:
                history["loss"].append([done, float(_to_host(loss))])
                postfix["loss"] = f"{history['loss'][-1][1]:.4f}"
            if held is not None and cfg.eval_every and done % cfg.eval_every == 0:
                r2 = evaluate(held_rows)
                rec = {
                    "step": done,
                    "median_r2": float(np.nanmedian(r2[0])),
                    "median_r2_nosink": float(np.nanmedian(r2[SINKS])),
                }
                history["eval"].append(rec)
                postfix["R2"] = f"{rec['median_r2']:.3f}"
            if cfg.ckpt_every and done % cfg.ckpt_every == 0:
                save(done)
            bar.set_postfix(postfix, refresh=False)
            bar.update(1)
        bar.close()
        save(end if start < end else start)

        canon = to_canonical(state)
        params = Gates.from_state(gate, jax.tree.map(_to_host, canon["params"]))
        if held is not None and end == cfg.steps:
            r2 = evaluate(held_rows_all)
            summary = {
                "tau": cfg.tau,
                "steps": end,
                "eval_keys": int(len(held_rows_all)),
                **summarize_r2(r2[0].reshape(nl, nk)),
                "nosink": summarize_r2(r2[SINKS].reshape(nl, nk)),
            }
            history["summary"] = summary
        history["seconds"] = time.perf_counter() - t0
        return params, history
    finally:
        if manager is not None:
            manager.close()


def _train_step(cfg: TrainConfig, tx, head_w_G, state, batch):
    loss, grads = jax.value_and_grad(lambda p: _loss_fn(cfg, head_w_G, p, batch))(state["params"])
    updates, opt = tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return {"params": params, "opt": opt, "step": state["step"] + 1}, loss


# ----------------------------------------------------------------------------- multi-host


def init_distributed(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto: bool = False,
    cpu_collectives: str = "gloo",
) -> bool:
    """Start jax.distributed when several processes are asked for (or `auto`, for clusters
    JAX can read the topology of). Call before any other JAX use. Returns True if started."""
    if not auto and (num_processes is None or num_processes <= 1):
        return False
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    if auto:
        jax.distributed.initialize()
    else:
        if coordinator is None or process_id is None:
            raise ValueError("multi-process runs need --coordinator and --process-id")
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=num_processes,
            process_id=process_id,
        )
    return True


# ----------------------------------------------------------------------------- CLI


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Register the `train-gates` command on an argparse subparsers object."""
    dflt = TrainConfig()
    p = subparsers.add_parser(
        "train-gates",
        help="train lifespan gates on a label store and report held-out R²",
        description="Train one small MLP gate per (layer, KV head) to predict log4(1 + "
        "lifespan) from the pre-RoPE key, with sharded jit steps and orbax checkpoints "
        "(a rerun with the same --ckpt-dir resumes).",
    )
    a = p.add_argument
    a(
        "--train",
        required=True,
        nargs="+",
        help="label store(s) to train on (directories with metadata.json; several are joined)",
    )
    a("--eval", default=None, help="held-out label store for R² (optional)")
    a("--tau", type=float, default=dflt.tau, help="attention threshold of the labels to fit")
    a("--steps", type=int, default=dflt.steps, help="optimiser steps")
    a("--batch-size", type=int, default=dflt.batch_size, help="keys per step (global)")
    a("--lr", type=float, default=dflt.lr, help="peak learning rate (AdamW)")
    a("--weight-decay", type=float, default=dflt.weight_decay, help="AdamW weight decay")
    a("--warmup", type=int, default=dflt.warmup, help="linear warmup steps before cosine decay")
    a(
        "--loss",
        choices=LOSSES,
        default=dflt.loss,
        help="mse, huber, or censored (uses right-censored keys as lower bounds)",
    )
    a("--huber-delta", type=float, default=dflt.huber_delta, help="huber delta in label stds")
    a("--hidden", type=int, default=32, help="hidden width of each gate (0: linear gate)")
    a("--activation", default="gelu", help="hidden activation: gelu, relu, tanh or silu")
    a(
        "--pair-norms",
        choices=["none", "half", "interleaved"],
        default="none",
        help="also feed the log length of every RoPE coordinate pair (half: rotate-half pairs)",
    )
    a("--no-key-norm", action="store_true", help="do not feed log ||key|| to the gates")
    a("--no-position", action="store_true", help="do not feed the position to the gates")
    a("--pos-clip", type=int, default=1024, help="positions beyond this read as this")
    a(
        "--exclude-sinks",
        type=int,
        default=dflt.exclude_sinks,
        help="leave the first N positions of every window out of training",
    )
    a("--seed", type=int, default=dflt.seed, help="seed of init and sampling")
    a(
        "--data-shards",
        type=int,
        default=dflt.data_shards,
        help="sampling shards; the process count must divide it",
    )
    a("--eval-every", type=int, default=dflt.eval_every, help="steps between R² evaluations")
    a(
        "--eval-max-rows",
        type=int,
        default=dflt.eval_max_rows,
        help="held-out keys used by the periodic evaluation (0: all)",
    )
    a("--ckpt-dir", default=None, help="orbax checkpoint directory (resumes if it has one)")
    a("--ckpt-every", type=int, default=dflt.ckpt_every, help="steps between checkpoints")
    a("--keep", type=int, default=dflt.keep_checkpoints, help="checkpoints to keep (0: all)")
    a(
        "--stop-after",
        type=int,
        default=None,
        help="stop and checkpoint at this step (as if killed); rerun to resume",
    )
    a("--mesh-data", type=int, default=None, help="size of the mesh's data axis")
    a("--mesh-model", type=int, default=None, help="size of the mesh's model (heads) axis")
    a("--coordinator", default=None, help="host:port of process 0 for multi-process runs")
    a("--num-processes", type=int, default=None, help="number of processes (multi-host)")
    a("--process-id", type=int, default=None, help="this process's index (multi-host)")
    a(
        "--distributed",
        choices=["off", "auto"],
        default="off",
        help="auto: jax.distributed.initialize() from the cluster environment",
    )
    a("--no-progress", action="store_true", help="no progress bar")
    a("--json", action="store_true", help="print the summary as one JSON object")
    a("--out", default=None, help="also write the summary JSON to this file")
    p.set_defaults(func=cmd_train_gates)
    return p


def cmd_train_gates(args: argparse.Namespace) -> int:
    """Run `train-gates` from parsed arguments."""
    init_distributed(
        args.coordinator, args.num_processes, args.process_id, auto=args.distributed == "auto"
    )
    cfg = TrainConfig(
        tau=args.tau,
        lr=args.lr,
        weight_decay=args.weight_decay,
        steps=args.steps,
        batch_size=args.batch_size,
        warmup=args.warmup,
        loss=args.loss,
        huber_delta=args.huber_delta,
        eval_every=args.eval_every,
        eval_max_rows=args.eval_max_rows,
        ckpt_every=args.ckpt_every,
        keep_checkpoints=args.keep,
        seed=args.seed,
        exclude_sinks=args.exclude_sinks,
        data_shards=args.data_shards,
    )
    store = open_store(args.train)
    nl, nk, d = store.shape
    gate = GateConfig(
        num_layers=nl,
        num_kv_heads=nk,
        head_dim=d,
        hidden=args.hidden,
        key_norm=not args.no_key_norm,
        pair_norms=args.pair_norms,
        position=not args.no_position,
        pos_clip=args.pos_clip,
        activation=args.activation,
    )
    mesh = shd.make_mesh(args.mesh_data, args.mesh_model, num_heads=nl * nk)
    _, hist = train_gates(
        store,
        args.eval,
        cfg,
        args.ckpt_dir,
        mesh,
        gate=gate,
        stop_after=args.stop_after,
        progress=not args.no_progress,
    )
    if jax.process_index() != 0:
        return 0
    report = {
        "model": store.meta["model"],
        "train_config": cfg.to_dict(),
        "gate_config": gate.to_dict(),
        "mesh": dict(zip(shd.AXES, shd.mesh_shape(mesh))),
        "processes": jax.process_count(),
        "ckpt_dir": args.ckpt_dir,
        "resumed_from": hist["resumed_from"],
        "final_loss": hist["loss"][-1][1] if hist["loss"] else None,
        "eval": hist["eval"],
        "summary": hist["summary"],
        "seconds": round(hist["seconds"], 2),
    }
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_table(report)
    return 0


def _print_table(report: dict) -> None:
    print(f"model {report['model']}  mesh {report['mesh']}  processes {report['processes']}")
    print(f"train config {report['train_config']}")
    print(f"gate config  {report['gate_config']}")
    s = report["summary"]
    if s is None:
        print(f"final loss {report['final_loss']}  (no held-out summary)")
        return
    print(f"tau {s['tau']}: {s['eval_keys']} held-out keys, {s['steps']} steps")
    print(f"{'layer':>5} {'median R2':>10} {'(no sinks)':>10}")
    for i, (a, b) in enumerate(zip(s["per_layer_median_r2"], s["nosink"]["per_layer_median_r2"])):
        print(f"{i:>5} {a:>10.3f} {b:>10.3f}")
    print(f"layer-0 heads R2: {s['layer0_r2']}  (no sinks: {s['nosink']['layer0_r2']})")
    print(
        f"median R2 over all heads: {s['median_r2']:.4f}  "
        f"(no sinks: {s['nosink']['median_r2']:.4f})"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m train.train_gates [train-gates] --train ... --eval ...`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "train-gates":
        argv = ["train-gates", *argv]
    parser = argparse.ArgumentParser(prog="python -m train.train_gates")
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"train-gates: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

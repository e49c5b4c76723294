"""Losses and held-out R² of the gates (docs/design.md: gate, censoring, R²).

Losses (all on labels standardised per head by the training label std, so every head counts
the same): "mse"; "huber" (delta in std units); "censored": uncensored keys as mse, and keys
whose label is only a lower bound (right-censored rows near the end of a window, and
lifespans clipped at the cap) pay only for predictions below that bound. "mse" and "huber"
train on uncensored rows only (the trainer's choice of rows).

R² per (layer, KV head) is computed from per-head sums (count, sum y, sum y², sum of squared
residuals) accumulated over sharded batches, on uncensored keys, with and without the first
positions (attention sinks).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from smartkv_jax import sharding as shd
from smartkv_jax.errors import SmartKVError
from smartkv_jax.gates import Gates, apply_heads, flatten_heads

from .batches import batch_arrays, batch_shardings, global_batch
from .distributed import to_host
from .label_store import LabelStore, eval_rows, open_store

LOSSES = ("mse", "huber", "censored")


class NonFiniteError(SmartKVError):
    """Training or evaluation met NaN or infinite values (a loss, the gates' weights, R² sums):
    the label store holds non-finite keys, or training diverged."""


def loss_fn(
    gates_G: Gates,
    batch: dict[str, jax.Array],
    head_w_G: jax.Array,
    *,
    loss: str,
    huber_delta: float = 1.0,
) -> jax.Array:
    """Weighted mean loss over a batch (see the module docstring). gates_G: leaves [G, ...];
    head_w_G: per-head weights (0 for padding heads); batch rows weighted by batch["w"]."""
    yhat_BG = apply_heads(gates_G, batch["keys"], batch["pos"])
    scale_G = jax.lax.stop_gradient(gates_G.norm["y_sigma"][...])
    r_BG = (yhat_BG - batch["y"]) / scale_G[None]
    if loss == "mse":
        per = r_BG**2
    elif loss == "huber":
        per = 2.0 * optax.huber_loss(r_BG, delta=huber_delta)
    else:  # censored: lower-bound labels pay only for predictions below the bound
        per = jnp.where(batch["lb"], jax.nn.relu(-r_BG) ** 2, r_BG**2)
    w_BG = batch["w"][:, None] * head_w_G[None, :]
    return jnp.sum(per * w_BG) / jnp.maximum(jnp.sum(w_BG), 1.0)


def eval_sums(excludes: tuple[int, ...], gates_G: Gates, batch) -> jax.Array:
    """[len(excludes), 4, G]: count, sum y, sum y², sum residual² per head, over rows with
    weight w and pos >= each entry of `excludes`."""
    yhat = apply_heads(gates_G, batch["keys"], batch["pos"])
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


def r2_from_sums(s: np.ndarray) -> np.ndarray:
    """R² per head from [4, G] float64 sums (nan where a head has no spread)."""
    n, sy, syy, sres = s
    with np.errstate(divide="ignore", invalid="ignore"):
        sstot = syy - sy * sy / np.maximum(n, 1)
        r2 = 1.0 - sres / sstot
    return np.where((n > 1) & (sstot > 1e-9), r2, np.nan)


def evaluate(
    gates_G: Gates,
    store: LabelStore,
    tau: float,
    rows: np.ndarray,
    mesh,
    excludes: tuple[int, ...],
    batch: int,
    fns: dict,
) -> dict[int, np.ndarray]:
    """R² per flat head (first L*K entries) of sharded gates (leaves [G_pad, ...]) on `rows`,
    for each minimum position in `excludes`. Each process feeds its own block of every chunk;
    `fns` caches the jitted sums between calls."""
    nl, nk, d = store.shape
    g = nl * nk
    g_pad = gates_G.b_out.shape[0]
    data = shd.mesh_shape(mesh)[0]
    batch = -(-batch // data) * data
    r0, r1 = shd.process_row_range(mesh, batch)
    h = shd.process_index_range(shd.batch_heads_sharding(mesh, 3), (batch, g_pad, d), 1)
    key = ("eval", excludes)
    if key not in fns:
        fns[key] = jax.jit(
            lambda p, b: eval_sums(excludes, p, b),
            in_shardings=(shd.gate_shardings(gates_G, mesh), batch_shardings(mesh)),
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
        arrays = batch_arrays(store, padded, tau_i, g_pad, h, w)
        out = fns[key](gates_G, global_batch(arrays, mesh, batch, g_pad, d))
        total += to_host(out).astype(np.float64)
    if not np.isfinite(total).all():
        raise NonFiniteError(
            f"the held-out R² of the gates on {store.name} is not finite: the store holds NaN or "
            "infinite keys, or the gates' weights are not finite"
        )
    return {e: r2_from_sums(total[i])[:g] for i, e in enumerate(excludes)}


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
    < exclude_first (docs/design.md: R²). params leaves [L, K, ...]. nan for a head whose
    labels do not vary."""
    store = open_store(store)
    want = (params.cfg.num_layers, params.cfg.num_kv_heads, params.cfg.head_dim)
    if store.shape != want:
        raise ValueError(f"gates are for (L, K, D)={want} but {store.name} holds {store.shape}")
    mesh = mesh or shd.make_mesh(devices=jax.local_devices())
    g_pad = shd.padded_heads(params.cfg.num_heads, mesh)
    flat = flatten_heads(jax.tree.map(np.asarray, params), pad_to=g_pad)
    flat = shd.shard_tree(flat, shd.gate_shardings(flat, mesh))
    r2 = evaluate(flat, store, tau, eval_rows(store), mesh, (exclude_first,), batch, {})
    return r2[exclude_first].reshape(params.cfg.num_layers, params.cfg.num_kv_heads)


def summarize_r2(r2_LK: np.ndarray) -> dict[str, Any]:
    """Median R² overall and per layer, and the layer-0 heads (NaN where no head has an
    R², which JSON output turns into null)."""
    r2_LK = np.asarray(r2_LK, np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices: NaN, no warning
        return {
            "median_r2": float(np.nanmedian(r2_LK)),
            "mean_r2": float(np.nanmean(r2_LK)),
            "per_layer_median_r2": [round(float(x), 4) for x in np.nanmedian(r2_LK, axis=1)],
            "layer0_r2": [round(float(x), 4) for x in r2_LK[0]],
            "r2_LK": [[round(float(x), 4) for x in row] for row in r2_LK],
        }

"""Training batches and normalisation statistics from a label store (docs/design.md:
sharding and scale).

Sampling: the trainable rows are dealt round-robin into `data_shards` fixed shards; every
shard has its own seeded stream of epoch permutations (`ShardStream`), and a global batch is
the concatenation of `batch_size / data_shards` rows from each shard in shard order. A batch
is therefore a pure function of (seed, step), the same for any number of devices or
processes, and a process reads only the shards whose rows land on its devices.

Batches are dicts of arrays: keys [n, G, D], y [n, G] (labels), lb [n, G] (label is only a
lower bound), pos [n], w [n] (row weight), with rows over the mesh's "data" axis and the flat
head axis G over "model" (`batch_shardings`).

Normalisation statistics (key mean/std per head, log-norm, log pair norms, label mean/std)
come from per-shard float64 sums, gathered across processes and summed in shard order.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from smartkv_jax import sharding as shd
from smartkv_jax.gates import log_pair_norms

from .distributed import allgather_f64
from .label_store import LabelStore, label_of


def shard_rows(rows: np.ndarray, n_shards: int) -> list[np.ndarray]:
    """`rows` dealt round-robin into n_shards non-empty shards."""
    shards = [rows[s::n_shards] for s in range(n_shards)]
    if min(len(s) for s in shards) == 0:
        raise ValueError(f"only {len(rows)} trainable rows for {n_shards} data shards")
    return shards


class ShardStream:
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


def batch_arrays(
    store: LabelStore,
    rows: np.ndarray,
    tau_i: int,
    g_pad: int,
    heads: tuple[int, int],
    weight: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Host arrays of one process-local batch of `rows` (see the module docstring), for flat
    heads heads[0]:heads[1] of the G = L*K heads padded to g_pad."""
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


def batch_shardings(mesh) -> dict[str, Any]:
    """Shardings of a global batch: rows over "data", heads over "model"."""
    return {
        "keys": shd.batch_heads_sharding(mesh, 3),
        "y": shd.batch_heads_sharding(mesh, 2),
        "lb": shd.batch_heads_sharding(mesh, 2),
        "pos": shd.batch_sharding(mesh, 1),
        "w": shd.batch_sharding(mesh, 1),
    }


def global_batch(local: dict[str, np.ndarray], mesh, rows: int, g_pad: int, d: int):
    """Global jax.Arrays of a batch of `rows` rows from this process's part `local`."""
    sh = batch_shardings(mesh)
    shapes = {
        "keys": (rows, g_pad, d),
        "y": (rows, g_pad),
        "lb": (rows, g_pad),
        "pos": (rows,),
        "w": (rows,),
    }
    return {k: shd.make_global(local[k], sh[k], shapes[k]) for k in sh}


def shard_sums(store: LabelStore, rows: np.ndarray, tau_i: int, pairing: str, chunk=4096):
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


def stats_from_sums(total: np.ndarray, shape: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """Normalisation statistics (names as in `Gates.norm`, leaves [L, K, ...]) from the
    summed `shard_sums` vectors of a store of shape (L, K, D)."""
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


def normalization_stats(
    store: LabelStore,
    rows_by_shard: list[np.ndarray],
    my_shards: list[int],
    tau_i: int,
    pairing: str,
    rows_per_shard: int,
) -> dict[str, np.ndarray]:
    """Statistics over at most `rows_per_shard` evenly spaced rows of every shard: this
    process sums its shards, and the sums of all processes are added in shard order (so the
    result is the same for any process count)."""
    sums = []
    for s in my_shards:
        rows = rows_by_shard[s]
        if len(rows) > rows_per_shard:
            rows = rows[np.linspace(0, len(rows) - 1, rows_per_shard).astype(int)]
        sums.append(shard_sums(store, np.sort(rows), tau_i, pairing))
    gathered = allgather_f64(np.stack(sums))  # [P, S_local, V] in process order
    total = np.zeros(gathered.shape[-1])
    for row in gathered.reshape(-1, gathered.shape[-1]):  # shard order, same for any P
        total += row
    return stats_from_sums(total, store.shape)

"""Which rows of a oneshot compression decode together (smartkv_jax/oneshot.py): a decode
step reads the weights once per batch and every row's cache whole, so rows of like slot
counts share a batch and rows of unlike ones are split where another weight read costs less
than the padding (docs/design.md: the oneshot protocol)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from .model import Transformer

SLOT_COST = 3.5  # a cached key/value byte over a weight byte, in a decode step's time


def batch_cost_slots(model: Transformer) -> float:
    """What one more decode batch costs a step (reading the weights once more) in rows x
    slots of the compressed (global) layers' cache. On XLA's CPU backend a decode step's
    attention takes about SLOT_COST times as long per byte as its weight matmuls
    (SmolLM2-135M in float32: about 0.0125 ms a row-slot against 40 ms for the weights,
    docs/design.md)."""
    cfg = model.cfg
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    glob = sum(1 for i in range(cfg.num_layers) if not cfg.window(i))
    slot_bytes = max(glob, 1) * 2 * cfg.num_kv_heads * cfg.head_dim * np.dtype(model.dtype).itemsize
    return weight_bytes / (slot_bytes * SLOT_COST)


def decode_batches(sizes_R: Sequence[int], batch_cost: float) -> list[list[int]]:
    """The rows (by index) split into decode batches of like slot counts: a batch of n rows
    whose largest takes S slots costs batch_cost + n * S a step (each row then attends over
    S slots), and the split minimizes the sum (rows sorted by size, cut where a new batch
    pays). Batches in ascending size; rows in each by index."""
    order = np.argsort(np.asarray(sizes_R), kind="stable")
    s = np.asarray(sizes_R, np.float64)[order]
    best, cut = np.zeros(len(s) + 1), np.zeros(len(s) + 1, np.int64)
    for j in range(1, len(s) + 1):
        costs = [best[i] + batch_cost + (j - i) * s[j - 1] for i in range(j)]
        cut[j] = int(np.argmin(costs))
        best[j] = costs[cut[j]]
    batches, j = [], len(s)
    while j:
        batches.append(sorted(order[cut[j] : j].tolist()))
        j = cut[j]
    return batches[::-1]

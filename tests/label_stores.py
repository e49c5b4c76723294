"""Synthetic label stores for the trainer's tests: lifespans are a planted smooth function of
the key (different per head and tau), rounded and clipped at the cap."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from train.label_store import StoreWriter

L, K, D = 2, 3, 8
T, CAP = 128, 64
TAUS = (0.05, 0.11)


def make_store(path: Path, *, n_windows: int, seed: int, model: str = "synthetic") -> Path:
    """A store of `n_windows` windows of T keys of book.txt, written by `StoreWriter`."""
    rng = np.random.default_rng(seed)
    plant = np.random.default_rng(1234)  # the same planted function for every store
    w_TLKD = plant.normal(size=(len(TAUS), L, K, D)) / np.sqrt(D)
    mu_LKD = plant.normal(size=(L, K, D)) * 3
    scale_LKD = np.exp(plant.normal(size=(L, K, D)))
    keys = (rng.normal(size=(n_windows * T, L, K, D)) * scale_LKD + mu_LKD).astype(np.float32)
    z = np.einsum("nlkd,tlkd->ntlk", (keys - mu_LKD) / scale_LKD, w_TLKD)
    life = np.clip(np.round(4.0 ** (1.8 + 1.4 * np.tanh(z)) - 1), 0, CAP).astype(np.int32)
    pos = np.arange(T, dtype=np.int32)
    writer = StoreWriter(L, K, D, len(TAUS))
    for w in range(n_windows):
        rows = slice(w * T, (w + 1) * T)
        labels = {"key": keys[rows], "lifespan": life[rows], "censored": pos > T - 1 - CAP}
        writer.add_window({**labels, "pos": pos}, "book.txt", w)
    meta = {
        "model": model,
        "taus": list(TAUS),
        "window": T,
        "cap": CAP,
        "sources": ["book.txt"],
        "num_layers": L,
        "num_kv_heads": K,
        "head_dim": D,
        "n_windows": n_windows,
    }
    writer.write(path, meta)
    return path

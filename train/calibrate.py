"""Derive a hybrid per-layer policy table from label statistics under a memory budget.

Rule (a refinement of the seed's): for each layer, from the uncensored keys' lifespans,
- short-lived layers (95% of keys live <= `short` tokens, every head) get 32 recent + 4 sinks;
- layers with few long-lived keys (under `long_share` of keys live >= 64 tokens in every
  head) keep recent tokens only;
- the rest are gated.
Non-window layers share the remaining budget in proportion to their expected number of live
keys, max over heads of mean(L + 1) (Little's law: keys arrive one per token and stay L + 1
tokens), with a floor of 48 slots.
"""

from __future__ import annotations

import numpy as np

from smartkv_jax.policy import LayerPolicy, PolicyConfig

from .train_gates import open_store


def layer_statistics(store_path: str, tau: float = 0.05) -> dict[str, np.ndarray]:
    """Per-layer lifespan statistics of the uncensored keys: q95 [L] (max over heads),
    long_share [L] (max over heads of the share of keys with L >= 64), live [L] (max over
    heads of mean(L + 1))."""
    store = open_store(store_path)
    life = store.lifespan_NTLK[~store.censored_N, store.tau_index(tau)].astype(np.float64)
    if life.shape[0] == 0:
        raise ValueError(f"label store {store_path} has no uncensored keys")
    return {
        "q95": np.quantile(life, 0.95, axis=0).max(-1),
        "long_share": (life >= 64).mean(0).max(-1),
        "live": (life + 1).mean(0).max(-1),
    }


def calibrate(
    store_path: str,
    context: int,
    memory_fraction: float,
    *,
    tau: float = 0.05,
    short: float = 64.0,
    long_share: float = 0.1,
) -> PolicyConfig:
    """A per-layer policy table using `memory_fraction` of the full cache at `context`."""
    stats = layer_statistics(store_path, tau)
    n = len(stats["q95"])
    kinds = np.where(
        stats["q95"] <= short,
        "window",
        np.where(stats["long_share"] < long_share, "recent", "gated"),
    )
    total = int(memory_fraction * context * n)
    window_slots = 36 * int((kinds == "window").sum())
    rest = np.flatnonzero(kinds != "window")
    spare = total - window_slots - 48 * len(rest)
    if spare < 0:
        raise ValueError(
            f"a budget of {memory_fraction} x {context} tokens cannot give every layer 48 slots"
        )
    need = stats["live"][rest]
    caps = np.zeros(n, int)
    caps[rest] = 48 + np.floor(spare * need / need.sum()).astype(int)
    caps = np.minimum(caps, context)
    layers = []
    for i in range(n):
        if kinds[i] == "window":
            layers.append(LayerPolicy("window", capacity=36, n_sink=4))
        elif kinds[i] == "recent":
            layers.append(LayerPolicy("recent", capacity=int(caps[i])))
        else:
            layers.append(LayerPolicy("gated", capacity=int(caps[i]), margin=2.0))
    return PolicyConfig(layers=tuple(layers), name="hybrid-calibrated")

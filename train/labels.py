"""Lifespan labels: run the model over windows of text, keep every pre-RoPE key and how long
it is attended to (docs/design.md: lifespan, label, censoring).

Output is a label store (train/label_store.py: `metadata.json` plus a `datasets` Arrow dataset in
`data/`, one row per (window, position) with the key of every layer and KV head).

With `facts` > 0 every window also holds synthetic retrieval facts (train/facts.py).
"""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from pallas_kernels.lifespan import dense_lifespan, lifespan, reference_lifespan
from smartkv_jax.cache import init_cache
from smartkv_jax.data import read_text, text_files
from smartkv_jax.model import Transformer
from smartkv_jax.policy_table import PolicyConfig
from smartkv_jax.step import chunk_step, split_model

from .facts import fact_window
from .label_store import StoreWriter

DEFAULT_TAUS = (0.05, 0.11)


def _collect(q_BHCD, k_BKCD, k_pre_BKCD):
    return q_BHCD, k_BKCD, k_pre_BKCD


def lifespans_of_layer(
    q_BHTD: jax.Array, k_BKTD: jax.Array, tau: float, method: str = "auto"
) -> jax.Array:
    """L_BKT int32 for one layer. method: "auto" (Pallas kernel on TPU, blockwise jnp
    elsewhere), "kernel", "blockwise" or "dense" (builds the T x T matrix; for comparison)."""
    if method == "auto":
        method = "kernel" if jax.default_backend() == "tpu" else "blockwise"
    if method == "kernel":
        return lifespan(q_BHTD, k_BKTD, tau=tau)
    if method == "blockwise":
        return reference_lifespan(q_BHTD, k_BKTD, tau=tau)
    if method == "dense":
        return dense_lifespan(q_BHTD, k_BKTD, tau=tau)
    raise ValueError(f"unknown lifespan method {method!r}")


@partial(jax.jit, static_argnums=(2, 3, 4))
def all_layer_lifespans(
    q_LBHTD: jax.Array, k_LBKTD: jax.Array, taus: tuple[float, ...], cap: int, method: str
) -> jax.Array:
    """Lifespans of every layer's keys at each tau, clipped at cap: [L, n_tau, B, K, T]."""

    def one(qk):
        q, k = qk
        return jnp.stack([lifespans_of_layer(q, k, t, method) for t in taus])  # [n_tau, B, K, T]

    return jnp.minimum(jax.lax.map(one, (q_LBHTD, k_LBKTD)), cap)  # [L, n_tau, B, K, T]


def censored(window: int, cap: int) -> np.ndarray:
    """[T] bool: keys after T - 1 - cap have fewer than cap later queries in the window, so
    their lifespan is only a lower bound (docs/design.md: censoring)."""
    return np.arange(window) > window - 1 - cap


def window_labels(
    model: Transformer,
    tokens_T: Sequence[int],
    *,
    taus: Sequence[float] = DEFAULT_TAUS,
    cap: int = 1024,
    chunk: int = 512,
    method: str = "auto",
) -> dict[str, np.ndarray]:
    """Keys and lifespans of one window of T tokens.

    Returns key [T, L, K, D] (pre-RoPE, float32), lifespan [T, n_tau, L, K] (int32, clipped at
    cap), censored [T] (bool: fewer than cap later queries were observed) and pos [T].
    """
    t = len(tokens_T)
    if t % chunk:
        chunk = t
    policy = PolicyConfig.uniform(model.cfg.num_layers).resolve(t)
    cache = init_cache(model.cfg, policy, 1, model.dtype)
    graph, state = split_model(model, cache)
    toks = jnp.asarray(np.asarray(tokens_T, np.int32)[None])
    parts = []
    for s in range(0, t, chunk):
        pos = jnp.arange(s, s + chunk, dtype=jnp.int32)[None]
        out = chunk_step(graph, state, policy, toks[:, s : s + chunk], pos, cache, probe=_collect)
        cache = out.cache
        parts.append(out.probes)
    q, k, k_pre = (jnp.concatenate(x, axis=3) for x in zip(*parts))  # [L, 1, heads, T, D]
    life = all_layer_lifespans(q, k, tuple(float(x) for x in taus), cap, method)
    pos = np.arange(t, dtype=np.int32)
    return {
        "key": np.asarray(k_pre[:, 0].transpose(2, 0, 1, 3), np.float32),
        "lifespan": np.asarray(life[:, :, 0].transpose(3, 1, 0, 2), np.int32),
        "censored": censored(t, cap),
        "pos": pos,
    }


def extract_labels(
    model: Transformer,
    tokenizer,
    out_dir: str | Path,
    *,
    model_name: str,
    source: str | None = None,
    books: Sequence[str] | None = None,
    window: int = 2048,
    cap: int = 1024,
    taus: Sequence[float] = DEFAULT_TAUS,
    windows_per_doc: int = 2,
    first_window: int = 0,
    chunk: int = 512,
    facts: int = 0,
    seed: int = 0,
) -> dict:
    """Write a label store for `windows_per_doc` consecutive windows of each book, starting at
    window `first_window` (so stores with disjoint window ranges can be trained on together).
    `facts` > 0 puts that many retrieval facts in every window (`fact_window`; `seed` and the
    window fix them)."""
    cfg = model.cfg
    if window > cfg.max_position:
        raise ValueError(f"window {window} exceeds the model's context of {cfg.max_position}")
    if first_window < 0:
        raise ValueError(f"first_window must be >= 0, got {first_window}")
    if not 0 < cap < window:
        raise ValueError(f"cap must be in (0, window={window}), got {cap}")
    files = text_files(source)
    if books:
        wanted = {b.removesuffix(".txt") for b in books}
        files = [f for f in files if f.stem in wanted]
        missing = wanted - {f.stem for f in files}
        if missing:
            raise FileNotFoundError(f"books not found in the text source: {sorted(missing)}")
    jobs = []
    for f in files:
        ids = tokenizer(read_text(f)).input_ids
        last = min(first_window + windows_per_doc, len(ids) // window)
        if last <= first_window:
            raise ValueError(
                f"{f.name} has {len(ids)} tokens: no window of {window} from window {first_window}"
            )
        for w in range(first_window, last):
            text = ids[w * window : (w + 1) * window]
            if facts:
                text = fact_window(
                    tokenizer, text, window, facts, cap, [seed, zlib.crc32(f.name.encode()), w]
                )[0]
            jobs.append((f.name, w, text))
    writer = StoreWriter(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, len(taus))
    start = time.perf_counter()
    for doc, w, ids in tqdm(jobs, desc="labelling windows"):
        writer.add_window(window_labels(model, ids, taus=taus, cap=cap, chunk=chunk), doc, w)
    seconds = time.perf_counter() - start
    meta = {
        "model": model_name,
        "model_config": json.loads(cfg.to_json()),
        "taus": list(taus),
        "window": window,
        "cap": cap,
        "sources": sorted({d for d, _, _ in jobs}),
        "num_layers": cfg.num_layers,
        "num_kv_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "first_window": first_window,
        "facts": facts,
        "seed": seed,
        "n_windows": len(jobs),
        "tokens_per_s": len(jobs) * window / seconds,
    }
    return writer.write(out_dir, meta)

"""Lifespan labels: run the model over windows of text, keep every pre-RoPE key and how long
it is attended to (docs/design.md: lifespan, label, censoring).

Output is a label store (train/label_store.py: `metadata.json` plus a `datasets` Arrow dataset in
`data/`, one row per (window, position) with the key of every layer and KV head), written
window by window so that an interrupted run resumes (train/label_shards.py).

With `facts` > 0 every window also holds synthetic retrieval facts (train/facts.py).
"""

from __future__ import annotations

import json
import sys
import time
import zlib
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from pallas_kernels.lifespan import dense_lifespan, lifespan, reference_lifespan
from smartkv_jax.attention import AttentionRule
from smartkv_jax.cache import init_cache
from smartkv_jax.config import ModelConfig
from smartkv_jax.data import read_text, text_files
from smartkv_jax.errors import SmartKVError
from smartkv_jax.jsonio import dumps
from smartkv_jax.model import Transformer
from smartkv_jax.policy_table import PolicyConfig
from smartkv_jax.sharding import model_mesh
from smartkv_jax.step import chunk_step, split_model

from .distributed import on_every_process
from .facts import fact_window
from .label_processes import finish_run, open_run
from .label_shards import PartialStore
from .label_store import store_features

DEFAULT_TAUS = (0.05, 0.11)


def _collect(q_BHCD, k_BKCD, k_pre_BKCD):
    return q_BHCD, k_BKCD, k_pre_BKCD


def lifespans_of_layer(
    q_BHTD: jax.Array,
    k_BKTD: jax.Array,
    tau: float,
    method: str = "auto",
    rule: AttentionRule | None = None,
) -> jax.Array:
    """L_BKT int32 for one layer whose queries see keys under `rule` (scale and window;
    None: D ** -0.5, global). method: "auto" (the Pallas kernel on TPU for a global layer,
    blockwise jnp elsewhere), "kernel", "blockwise" or "dense"
    (builds the T x T matrix; for comparison)."""
    d = q_BHTD.shape[-1]
    rule = rule or AttentionRule(d**-0.5)
    if method == "auto":
        method = "kernel" if jax.default_backend() == "tpu" and not rule.window else "blockwise"
    if method == "kernel":
        if rule.window:
            raise ValueError("the lifespan kernel has no attention window")
        return lifespan(q_BHTD, k_BKTD, tau=tau, scale=rule.scale)
    how = {"tau": tau, "scale": rule.scale, "window": rule.window}
    if method == "blockwise":
        return reference_lifespan(q_BHTD, k_BKTD, **how)
    if method == "dense":
        return dense_lifespan(q_BHTD, k_BKTD, **how)
    raise ValueError(f"unknown lifespan method {method!r}")


@partial(jax.jit, static_argnums=(2, 3, 4, 5))
def all_layer_lifespans(
    q_LBHTD: jax.Array,
    k_LBKTD: jax.Array,
    taus: tuple[float, ...],
    cap: int,
    method: str,
    rules: tuple[AttentionRule, ...] | None = None,
) -> jax.Array:
    """Lifespans of every layer's keys at each tau, clipped at cap: [L, n_tau, B, K, T].
    rules[i]: how layer i's queries see keys (None: all global at D ** -0.5); layers sharing
    a rule run under one map."""
    rules = rules or (AttentionRule(q_LBHTD.shape[-1] ** -0.5),) * q_LBHTD.shape[0]
    out = [None] * len(rules)
    for rule in dict.fromkeys(rules):
        idx = [i for i, r in enumerate(rules) if r == rule]

        def one(qk, rule=rule):
            q, k = qk
            return jnp.stack([lifespans_of_layer(q, k, t, method, rule) for t in taus])

        life = jax.lax.map(one, (q_LBHTD[jnp.array(idx)], k_LBKTD[jnp.array(idx)]))
        for n, i in enumerate(idx):
            out[i] = life[n]
    return jnp.minimum(jnp.stack(out), cap)  # [L, n_tau, B, K, T]


def layer_rules(cfg: ModelConfig) -> tuple[AttentionRule, ...]:
    """How each layer's queries see keys, as the model runs them."""
    return tuple(AttentionRule(cfg.scale, cfg.window(i)) for i in range(cfg.num_layers))


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
    pad_to: int = 1,
) -> dict[str, np.ndarray]:
    """Keys and lifespans of one window of T tokens.

    pad_to: the window runs padded to a multiple of this many tokens, so windows of different
    lengths share compiled programs (the oracle's per-sample lifespans). The padding's queries
    are zeroed: query i then spreads 1/(i+1) (1/W in a W-token window) over the keys it sees,
    below every tau, so it ends no key's life; the outputs are cut back to T.
    Returns key [T, L, K, D] (pre-RoPE, float32), lifespan [T, n_tau, L, K] (int32, clipped at
    cap), censored [T] (bool: fewer than cap later queries were observed) and pos [T].
    """
    t = len(tokens_T)
    n = -(-t // pad_to) * pad_to
    taus = tuple(float(x) for x in taus)
    _check_padding(model.cfg, t, n, taus)
    if n % chunk:
        chunk = n
    policy = PolicyConfig.uniform(model.cfg.num_layers).resolve(n, model.cfg.layer_windows)
    cache = init_cache(model.cfg, policy, 1, model.dtype, mesh=model_mesh(model))
    graph, state = split_model(model, cache)
    toks = jnp.asarray(np.pad(np.asarray(tokens_T, np.int32), (0, n - t))[None])
    pos_T = jnp.asarray(np.where(np.arange(n) < t, np.arange(n), -1).astype(np.int32)[None])
    parts = []
    for s in range(0, n, chunk):
        part = slice(s, s + chunk)
        out = chunk_step(graph, state, policy, toks[:, part], pos_T[:, part], cache, probe=_collect)
        cache = out.cache
        parts.append(out.probes)
    q, k, k_pre = (jnp.concatenate(x, axis=3) for x in zip(*parts))  # [L, 1, heads, N, D]
    q = q.at[:, :, :, t:].set(0.0)  # the padding's queries attend uniformly
    life = all_layer_lifespans(q, k, taus, cap, method, layer_rules(model.cfg))
    pos = np.arange(t, dtype=np.int32)
    return {
        "key": np.asarray(k_pre[:, 0, :, :t].transpose(2, 0, 1, 3), np.float32),
        "lifespan": np.asarray(life[:, :, 0, :, :t].transpose(3, 1, 0, 2), np.int32),
        "censored": censored(t, cap),
        "pos": pos,
    }


def _check_padding(cfg, t: int, n: int, taus: tuple[float, ...]) -> None:
    """Padding past T tokens is inert only if a uniform query's weight on a key (1/(i+1), or
    1/W in a W-token window) is below every tau (ValueError otherwise)."""
    if n == t:
        return
    spread = min([t + 1] + [w for w in cfg.layer_windows if w])
    if min(taus) * spread <= 1.0:
        raise ValueError(
            f"a window of {t} tokens cannot be padded at tau {min(taus)}: a padding query "
            f"would give a key weight 1/{spread}; pass pad_to=1"
        )


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
    overwrite: bool = False,
) -> dict:
    """Write a label store for `windows_per_doc` consecutive windows of each book, starting at
    window `first_window` (so stores with disjoint window ranges can be trained on together).
    `facts` > 0 puts that many retrieval facts in every window (`fact_window`; `seed` and the
    window fix them). Returns the store's metadata.

    Resumable and never destructive (train/label_shards.py): finished windows are kept in
    `<out_dir>.partial/` and skipped by a rerun of the same setup (`label_setup`), the store is
    moved into place at the end, a store of the same setup at `out_dir` is kept as it is, and
    one of another setup is replaced only with `overwrite`. Under jax.distributed every process
    calls this alike and labels its share of the windows (train/label_processes.py).
    """
    cfg = model.cfg
    _check_window(cfg.max_position, window, first_window, cap)
    files = _book_files(source, books)
    jobs = _window_jobs(tokenizer, files, window, first_window, windows_per_doc, facts, cap, seed)
    setup = label_setup(
        model,
        model_name,
        jobs,
        taus=taus,
        window=window,
        cap=cap,
        chunk=chunk,
        first_window=first_window,
        windows_per_doc=windows_per_doc,
        facts=facts,
        seed=seed,
    )
    features = store_features(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, len(taus))
    windows = [(doc, w) for doc, w, _ in jobs]
    run, mine = open_run(out_dir, setup, windows, features, overwrite)
    if run.complete is not None:
        tqdm.write(
            f"label store {out_dir} already holds these {len(jobs)} windows: kept", sys.stderr
        )
        return run.complete
    how = dict(taus=setup["taus"], cap=cap, chunk=chunk)
    on_every_process("labelling", lambda: _label_windows(model, jobs, run, mine, **how))
    shapes = {k: getattr(cfg, k) for k in ("num_layers", "num_kv_heads", "head_dim")}
    return finish_run(run, {**setup, **shapes, "n_windows": len(jobs)})


def _check_window(max_position: int, window: int, first_window: int, cap: int) -> None:
    if window > max_position:
        raise SmartKVError(f"window {window} exceeds the model's context of {max_position}")
    if first_window < 0:
        raise SmartKVError(f"first_window must be >= 0, got {first_window}")
    if not 0 < cap < window:
        raise SmartKVError(f"cap must be in (0, window={window}), got {cap}")


def _book_files(source: str | None, books: Sequence[str] | None) -> list[Path]:
    """The text files to label: those of `source`, only `books` (file stems) if given."""
    files = text_files(source)
    if books:
        wanted = {b.removesuffix(".txt") for b in books}
        files = [f for f in files if f.stem in wanted]
        missing = wanted - {f.stem for f in files}
        if missing:
            raise FileNotFoundError(f"books not found in the text source: {sorted(missing)}")
    return files


def _window_jobs(
    tokenizer,
    files: Sequence[Path],
    window: int,
    first_window: int,
    windows_per_doc: int,
    facts: int,
    cap: int,
    seed: int,
) -> list[tuple[str, int, list[int]]]:
    """(file name, window index, token ids) of every window to label, in order."""
    jobs = []
    for f in files:
        ids = tokenizer(read_text(f)).input_ids
        last = min(first_window + windows_per_doc, len(ids) // window)
        if last <= first_window:
            raise SmartKVError(
                f"{f.name} has {len(ids)} tokens: no window of {window} from window {first_window}"
            )
        for w in range(first_window, last):
            text = ids[w * window : (w + 1) * window]
            if facts:
                text = fact_window(
                    tokenizer, text, window, facts, cap, [seed, zlib.crc32(f.name.encode()), w]
                )[0]
            jobs.append((f.name, w, [int(t) for t in text]))
    return jobs


def label_setup(
    model: Transformer, model_name: str, jobs: Sequence[tuple[str, int, Sequence[int]]], **how
) -> dict:
    """Everything that fixes a label store's contents, as JSON values: the model (name, shape
    and a CRC-32 of its weights), the keyword settings `how` (taus, window, cap, chunk, ...),
    the source files and a CRC-32 of the windows' token ids (text, tokenizer and facts). Two
    runs with equal setups write equal stores, so a run resumes only the same setup."""
    tokens = 0
    for _, _, ids in jobs:
        tokens = zlib.crc32(np.asarray(ids, np.int64).tobytes(), tokens)
    setup = {
        "model": model_name,
        "model_config": json.loads(model.cfg.to_json()),
        "weights_crc32": weights_crc32(model),
        **how,
        "taus": [float(t) for t in how["taus"]],
        "sources": sorted({doc for doc, _, _ in jobs}),
        "tokens_crc32": f"{tokens:08x}",
    }
    return json.loads(dumps(setup))


def weights_crc32(model: Transformer) -> str:
    """CRC-32 (hex) of every array of the model's state, in a fixed order."""
    crc = 0
    for leaf in jax.tree.leaves(nnx.to_pure_dict(nnx.state(model))):
        crc = zlib.crc32(np.ascontiguousarray(np.asarray(leaf)).reshape(-1).view(np.uint8), crc)
    return f"{crc:08x}"


def _label_windows(
    model: Transformer, jobs, run: PartialStore, mine: Sequence[int], *, taus, cap, chunk
) -> None:
    """Label windows `mine` (this process's share of those `run` has not finished), saving
    each as soon as it is done."""
    if run.done:
        tqdm.write(
            f"resuming: {len(run.done)} of {len(jobs)} windows were labelled by an earlier run "
            f"({run.work})",
            sys.stderr,
        )
    desc = "labelling windows"
    if jax.process_count() > 1:
        desc += f" (process {jax.process_index()} of {jax.process_count()})"
    for i in tqdm(mine, desc=desc):
        doc, w, ids = jobs[i]
        start = time.perf_counter()
        labels = window_labels(model, ids, taus=taus, cap=cap, chunk=chunk)
        run.add(i, labels, doc, w, time.perf_counter() - start)

"""Streaming perplexity (the StreamingLLM long-text protocol) under a cache policy.

Each book is fed through the fixed-shape cache token by token (chunk 1, the exact protocol)
and every next token is scored from the cache as the policy left it. A chunk C > 1 feeds C
tokens per step: tokens inside a chunk also see each other before eviction runs, so the
cache a query reads is up to C-1 tokens larger than the budget. That is a faster
approximation and every output says so (`protocol_name`).

Books are batched, one batch row per book, all cut to the same number of tokens, so the
weights are read once per step for all books. Per-token NLLs are kept ([B, T-1], nats):
perplexity, per-position curves and a paired bootstrap between two policies all come from
them.

Text: the PG-19 test split through `datasets` when the hub is reachable (`source="pg19"`,
or `"auto"` which falls back to the local books), else any directory of .txt files
(`smartkv_jax.data`, default ../shared/data/gutenberg).
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from smartkv_jax import data as text_data
from smartkv_jax.cache import KVCache, init_cache
from smartkv_jax.data import read_text, text_files
from smartkv_jax.errors import SmartKVError
from smartkv_jax.model import Transformer
from smartkv_jax.policy_table import PolicyConfig, native_slots
from smartkv_jax.sharding import model_mesh, put_batch
from smartkv_jax.step import chunk_step, split_model

PG19_DATASET = "emozilla/pg19-test"  # the PG-19 test split as parquet (text column "text")
HUB_HOST = "huggingface.co"
DEFAULT_TOKENS = 8192  # SmolLM2's context
DEFAULT_BOOKS = 6
# the oracle's lifespan pass runs in chunks of this many tokens, padded to a multiple of it,
# so sequences of different lengths (RULER samples) share its compiled programs
ORACLE_CHUNK = 512


# ----------------------------------------------------------------------------- text


@dataclasses.dataclass(frozen=True)
class Book:
    """One evaluation text: `name` and its first tokens `ids` [T] (int32)."""

    name: str
    ids: np.ndarray


def protocol_name(chunk: int) -> str:
    """How tokens were fed: "token-by-token (exact)" or "chunked(C), approximate"."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    return "token-by-token (exact)" if chunk == 1 else f"chunked({chunk}), approximate"


def check_chunk(chunk: int, tokens: int, names: tuple[str, str] = ("chunk", "tokens")) -> None:
    """Refuse a sweep whose chunk holds every token of a book: every query would read the
    whole book before anything is evicted, so every policy would score as the full cache.
    `names`: what to call the two settings in the message (say the command's flags)."""
    if chunk >= tokens:
        raise SmartKVError(
            f"{names[0]} must be < {names[1]} ({tokens}), got {chunk}: one chunk would hold "
            "every token, so every policy would score as the full cache"
        )


def hub_reachable(host: str = HUB_HOST, timeout: float = 3.0) -> bool:
    """Whether the dataset hub answers a TCP connection (False offline or with
    HF_DATASETS_OFFLINE / HF_HUB_OFFLINE set)."""
    if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def pg19_texts(dataset: str = PG19_DATASET, split: str = "test") -> Iterator[tuple[str, str]]:
    """(name, text) of the PG-19 test books, streamed through `datasets` (needs the hub)."""
    import datasets

    ds = datasets.load_dataset(dataset, split=split, streaming=True)
    for i, row in enumerate(ds):
        name = str(row.get("short_book_title") or row.get("url") or f"pg19-{split}-{i}")
        yield name, row["text"]


def _local_texts(source: str | os.PathLike | None) -> Iterator[tuple[str, str]]:
    for f in text_files(source):
        yield f.stem, read_text(f)


def load_books(
    tokenizer: Any,
    *,
    source: str | os.PathLike | None = "auto",
    n_books: int = DEFAULT_BOOKS,
    n_tokens: int = DEFAULT_TOKENS,
    pg19_dataset: str = PG19_DATASET,
) -> tuple[list[Book], str]:
    """The first `n_tokens` tokens of up to `n_books` books, and a description of the text.

    source: "auto" (PG-19 test split when the hub is reachable, else the local books),
    "pg19" (PG-19 or an error), None (the local books) or a directory / .txt file.
    Books with fewer than `n_tokens` tokens are skipped. Raises ValueError when none is long
    enough, ConnectionError when "pg19" is asked for offline.
    """
    if n_books < 1 or n_tokens < 2:
        raise ValueError(f"need n_books >= 1 and n_tokens >= 2, got {n_books}, {n_tokens}")
    texts: Iterator[tuple[str, str]]
    if source in ("auto", "pg19"):
        if hub_reachable():
            texts, desc = pg19_texts(pg19_dataset), f"PG-19 test split ({pg19_dataset})"
        elif source == "pg19":
            raise ConnectionError(
                f"PG-19 needs the dataset hub ({HUB_HOST}), which is unreachable; pass a "
                "directory of .txt files instead"
            )
        else:
            texts, desc = _local_texts(None), f"local books: {text_data.DEFAULT_TEXT_DIR}"
    else:
        texts = _local_texts(source)
        desc = f"local books: {source or text_data.DEFAULT_TEXT_DIR}"
    books, skipped = [], []
    for name, text in texts:
        ids = tokenizer(text).input_ids
        if len(ids) < n_tokens:
            skipped.append(name)
            continue
        books.append(Book(name, np.asarray(ids[:n_tokens], np.int32)))
        if len(books) == n_books:
            break
    if not books:
        raise ValueError(f"no book in the text source has {n_tokens} tokens ({desc})")
    if skipped:
        desc += f"; skipped (shorter than {n_tokens} tokens): {', '.join(skipped)}"
    return books, desc


# ----------------------------------------------------------------------------- scoring


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def streaming_nll(
    model: Transformer,
    policy: PolicyConfig,
    tokens_BT: np.ndarray,
    *,
    chunk: int = 1,
    gates=None,
    oracle_LBKT: np.ndarray | None = None,
    progress: bool = True,
    desc: str = "perplexity",
) -> tuple[np.ndarray, KVCache]:
    """Per-token NLL [B, T-1] (nats, float32) of tokens 1..T-1 of each row, streamed through
    the cache under `policy` (resolved here at T) `chunk` tokens at a time.

    nll[b, t] scores token t+1 given tokens 0..t as the cache holds them. gates: leaves
    [L, K, ...] for gated layers. oracle_LBKT: true log4 lifespans [L, B, K, T] for oracle
    layers. Also returns the final cache (for its size).
    """
    cfg = model.cfg
    tokens_BT = np.asarray(tokens_BT, np.int32)
    b, t = tokens_BT.shape
    if t < 2:
        raise ValueError("need at least 2 tokens per row")
    if t > cfg.max_position:
        raise ValueError(f"{t} tokens exceed the model's context of {cfg.max_position}")
    protocol_name(chunk)
    policy = policy.resolve(t, cfg.layer_windows)
    if policy.needs_gates and gates is None:
        raise ValueError(f"policy {policy.name!r} has gated layers but no gates were given")
    if policy.needs_oracle and oracle_LBKT is None:
        raise ValueError(f"policy {policy.name!r} has oracle layers but no lifespans were given")
    padded = _round_up(t, chunk)
    tokens = np.zeros((b, padded), np.int32)
    tokens[:, :t] = tokens_BT
    pos = np.full((b, padded), -1, np.int32)
    pos[:, :t] = np.arange(t, dtype=np.int32)
    targets = np.zeros((b, padded), np.int32)
    targets[:, : t - 1] = tokens_BT[:, 1:]
    aux = {"gates": gates}
    if policy.needs_oracle:
        aux["oracle"] = jnp.asarray(oracle_LBKT, jnp.float32)
    mesh = model_mesh(model)
    cache = init_cache(cfg, policy, b, model.dtype, mesh=mesh)
    graph, state = split_model(model, cache)
    parts = []
    for s in tqdm(range(0, padded, chunk), desc=desc, disable=not progress, leave=False):
        out = chunk_step(
            graph,
            state,
            policy,
            put_batch(tokens[:, s : s + chunk], mesh),
            put_batch(pos[:, s : s + chunk], mesh),
            cache,
            aux,
            targets_BC=put_batch(targets[:, s : s + chunk], mesh),
        )
        cache = out.cache
        parts.append(out.nll)
    nll_BT = np.concatenate([np.asarray(p) for p in parts], axis=1)
    return nll_BT[:, : t - 1].astype(np.float32), cache


def oracle_scores(model: Transformer, tokens_T: Sequence[int], tau: float = 0.05) -> np.ndarray:
    """True log4(1 + lifespan) [L, K, T] (float32) of every key of one sequence: the scores
    of the oracle policy. Lifespans come from a full-cache pass over the sequence itself
    (train/labels.py), uncapped: the oracle knows each key's whole future in the sequence."""
    from train.labels import window_labels

    t = len(tokens_T)
    lab = window_labels(
        model, list(tokens_T), taus=(tau,), cap=t, chunk=min(t, ORACLE_CHUNK),
        pad_to=min(t, ORACLE_CHUNK),
    )  # fmt: skip
    life_TLK = lab["lifespan"][:, 0].astype(np.float32)
    return (np.log1p(life_TLK) / np.log(4.0)).transpose(1, 2, 0)


def oracle_for_books(
    model: Transformer, tokens_BT: np.ndarray, tau: float = 0.05, progress: bool = True
) -> np.ndarray:
    """Oracle scores [L, B, K, T] for a batch of sequences (one `oracle_scores` per row)."""
    rows = [
        oracle_scores(model, row, tau)
        for row in tqdm(tokens_BT, desc="oracle lifespans", disable=not progress, leave=False)
    ]
    return np.stack(rows, axis=1)


# ----------------------------------------------------------------------------- statistics


def perplexity(nll: np.ndarray) -> float:
    """exp(mean NLL) over every scored token."""
    return float(math.exp(float(np.mean(np.asarray(nll, np.float64)))))


def position_curve(nll_BT: np.ndarray) -> np.ndarray:
    """Mean NLL per position over books [T-1] (float64): index t scores token t+1."""
    return np.asarray(nll_BT, np.float64).mean(axis=0)


def binned_curve(curve_T: np.ndarray, bins: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(centre position, mean NLL) over `bins` equal spans of positions, for plots."""
    edges = np.linspace(0, len(curve_T), min(bins, len(curve_T)) + 1).astype(int)
    centres = np.array([(a + b - 1) / 2 for a, b in zip(edges[:-1], edges[1:])])
    means = np.array([curve_T[a:b].mean() for a, b in zip(edges[:-1], edges[1:])])
    return centres, means


def paired_bootstrap(
    nll_a: np.ndarray,
    nll_b: np.ndarray,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, float]:
    """Relative perplexity difference ppl_a / ppl_b - 1 and its bootstrap interval.

    Paired over tokens: both NLL arrays score the same tokens (same shape); each resample
    draws token indices with replacement and applies them to both, so
    ppl_a / ppl_b = exp(mean(nll_a - nll_b)) over the resample. Tokens of a book are not
    independent, so the interval is optimistic about long-range variation; it measures
    whether a difference is more than token-level noise.
    Returns {"rel_diff", "lo", "hi", "n_tokens", "n_boot"}.
    """
    a = np.asarray(nll_a, np.float64).ravel()
    b = np.asarray(nll_b, np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired bootstrap needs equal shapes, got {a.shape} and {b.shape}")
    d = a - b
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    block = max(1, 2_000_000 // max(len(d), 1))
    for s in range(0, n_boot, block):
        n = min(block, n_boot - s)
        idx = rng.integers(0, len(d), size=(n, len(d)))
        means[s : s + n] = d[idx].mean(axis=1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return {
        "rel_diff": float(math.expm1(d.mean())),
        "lo": float(math.expm1(lo)),
        "hi": float(math.expm1(hi)),
        "n_tokens": int(len(d)),
        "n_boot": int(n_boot),
    }


# ----------------------------------------------------------------------------- one policy


@dataclasses.dataclass
class PerplexityResult:
    """One policy's streaming perplexity over a batch of books.

    nll: [B, T-1] per-token NLL (nats). memory_actual: the policy's KV bytes over the native
    cache's at T tokens (measured on the cache that ran).
    """

    policy: str
    memory_actual: float
    ppl: float
    ppl_per_book: list[float]
    protocol: str
    n_tokens: int
    seconds: float
    nll: np.ndarray

    def summary(self) -> dict[str, Any]:
        """JSON-ready fields (the NLL array left out)."""
        d = dataclasses.asdict(self)
        d.pop("nll")
        return d


def evaluate_perplexity(
    model: Transformer,
    policy: PolicyConfig,
    books: Sequence[Book],
    *,
    chunk: int = 1,
    gates=None,
    oracle_LBKT: np.ndarray | None = None,
    progress: bool = True,
    desc: str | None = None,
) -> PerplexityResult:
    """Streaming perplexity of `books` (all of the same length T) under `policy`."""
    lengths = {len(bk.ids) for bk in books}
    if len(lengths) != 1:
        raise ValueError(f"books must have the same number of tokens, got {sorted(lengths)}")
    tokens = np.stack([bk.ids for bk in books])
    t = tokens.shape[1]
    start = time.perf_counter()
    nll, cache = streaming_nll(
        model,
        policy,
        tokens,
        chunk=chunk,
        gates=gates,
        oracle_LBKT=oracle_LBKT,
        progress=progress,
        desc=desc or f"ppl {policy.name}",
    )
    seconds = time.perf_counter() - start
    cfg, itemsize = model.cfg, jnp.dtype(model.dtype).itemsize
    native = native_slots(cfg.num_layers, t, cfg.layer_windows)  # windowed layers: W slots
    full_bytes = 2 * native * len(books) * cfg.num_kv_heads * cfg.head_dim * itemsize
    return PerplexityResult(
        policy=policy.name,
        memory_actual=cache.kv_bytes() / full_bytes,
        ppl=perplexity(nll),
        ppl_per_book=[perplexity(row) for row in nll],
        protocol=protocol_name(chunk),
        n_tokens=t,
        seconds=seconds,
        nll=nll,
    )

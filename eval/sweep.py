"""Run a policy x memory sweep of streaming perplexity and needle retrieval, resumably
(`smartkv eval`, smartkv_cli/eval.py).

Every finished (task, policy, memory fraction) is stored in the results directory
(eval/result_store.py) at once and skipped by a rerun, so an interrupted and resumed sweep
ends with the same results as an uninterrupted one. Memory is the policy's KV bytes over the
full cache's at the same context. See docs/design.md (evaluation).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np
from tqdm import tqdm

from smartkv_jax.model import Transformer
from smartkv_jax.policy_table import PolicyConfig, budget_effective
from train.policy_names import parse_policy

from . import needle as ndl
from . import perplexity as ppl_mod
from .result_store import ResultStore, slug
from .sweep_settings import Entry, NeedleSettings, PerplexitySettings, SweepSettings, sweep_entries


@dataclasses.dataclass
class SweepData:
    """A sweep's model and inputs; the books, their oracle scores and the needle prompts are
    loaded on first use and their description checked against the results directory."""

    store: ResultStore
    model: Transformer
    tokenizer: Any
    settings: SweepSettings
    progress: bool

    def policy(self, entry: Entry, context: int) -> PolicyConfig:
        """The entry's policy at `context` tokens (ValueError: a budget it cannot meet)."""
        return parse_policy(
            entry.policy,
            self.model.cfg.num_layers,
            context,
            entry.memory_fraction,
            self.settings.calibrated,
        )

    def check_inputs(self) -> None:
        """Load each task's inputs, which checks them against the results directory (also
        when no entry is left to run)."""
        for task in self.settings.tasks:
            _ = self.books if task == "ppl" else self.prompts

    @functools.cached_property
    def books(self) -> list[ppl_mod.Book]:
        s = self.settings.ppl
        books, desc = ppl_mod.load_books(
            self.tokenizer,
            source=None if s.text in ("", "local") else s.text,
            n_books=s.books,
            n_tokens=s.tokens,
            pg19_dataset=s.pg19_dataset,
        )
        self.store.check_config("ppl", _books_section(s, desc, books))
        return books

    @functools.cached_property
    def oracle_books_LBKT(self) -> np.ndarray:
        """True log4 lifespans [L, B, K, T] of the books' keys, cached in the store."""
        name = f"oracle/books_tau{self.settings.tau:g}.npy"
        if (self.store.dir / name).is_file():
            return self.store.load_array(name)
        tokens_BT = np.stack([b.ids for b in self.books])
        arr = ppl_mod.oracle_for_books(self.model, tokens_BT, self.settings.tau, self.progress)
        self.store.save_array(name, arr.astype(np.float32))
        return arr

    @functools.cached_property
    def prompts(self) -> list[ndl.NeedlePrompt]:
        s = self.settings.needle
        prompts = ndl.build_prompts(
            self.tokenizer,
            s.contexts,
            s.depths,
            haystack=s.haystack,
            fmt=s.fmt,
            max_new_tokens=s.max_new_tokens,
            seed=s.seed,
        )
        self.store.check_config("needle", _needle_section(s, prompts, self.tokenizer))
        return prompts


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
    model: Transformer,
    tokenizer: Any,
    settings: SweepSettings,
    *,
    model_name: str,
    gates=None,
    gates_info: dict[str, Any] | None = None,
    progress: bool = True,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """Run every entry of the sweep not yet in `out_dir`, storing each as soon as it is done.

    gates: for gated layers and the per-layer needle scores (gates_info describes them in
    the report). on_result(row) is called after each stored entry. Returns all rows of the
    sweep's entries (stored earlier or now), in entry order. Results of other settings in
    `out_dir` raise ConfigMismatchError, or with `overwrite` are moved aside (result_store).
    """
    if "ppl" in settings.tasks:
        ppl_mod.check_chunk(settings.ppl.chunk, settings.ppl.tokens)
    store = ResultStore(out_dir, overwrite=overwrite)
    store.check_config(
        "model",
        {
            "name": model_name,
            "config": json.loads(model.cfg.to_json()),
            "dtype": str(model.dtype),
        },
    )
    store.check_config("oracle_tau", settings.tau)
    store.check_config("gates", gates_info if gates is not None else None)
    entries = sweep_entries(settings)
    todo = _todo(store, entries)
    data = SweepData(store, model, tokenizer, settings, progress)
    if gates is None and any(_needs_gates(e, data) for e in todo):
        raise ValueError(
            "gated-only and hybrid need gates: pass a checkpoint (--gates DIR) or "
            "--random-gates to check the plumbing"
        )
    data.check_inputs()
    todo = _todo(store, entries)  # again: `overwrite` may have moved the old results aside
    bar = tqdm(todo, desc="sweep", disable=not progress)
    for e in bar:
        bar.set_postfix_str(e.key)
        row = run_entry(e, data, gates)
        store.append(row)
        if on_result is not None:
            on_result(row)
    done = store.done()
    return [done[e.key] for e in entries if e.key in done]


def _todo(store: ResultStore, entries: list[Entry]) -> list[Entry]:
    done = store.done()
    return [e for e in entries if e.key not in done]


def _needs_gates(e: Entry, data: SweepData) -> bool:
    s = data.settings
    context = s.ppl.tokens if e.task == "ppl" else max(s.needle.contexts)
    try:
        return data.policy(e, context).needs_gates
    except ValueError:
        return False


def run_entry(e: Entry, data: SweepData, gates) -> dict[str, Any]:
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
    run = _run_ppl if e.task == "ppl" else _run_needle
    return run(e, row, data, gates)


def _run_ppl(e: Entry, row: dict[str, Any], data: SweepData, gates) -> dict[str, Any]:
    s, windows = data.settings.ppl, data.model.cfg.layer_windows
    try:
        policy = data.policy(e, s.tokens)
    except ValueError as err:  # a budget the policy cannot meet: recorded, not retried
        return {**row, "error": str(err)}
    if row["memory_fraction"] is None:
        row["memory_fraction"] = round(policy.memory_fraction(s.tokens, windows), 6)
    res = ppl_mod.evaluate_perplexity(
        data.model,
        policy,
        data.books,
        chunk=s.chunk,
        gates=gates,
        oracle_LBKT=data.oracle_books_LBKT if policy.needs_oracle else None,
        progress=data.progress,
        desc=f"ppl {e.policy}@{row['memory_fraction']:g}",
    )
    nll_file = data.store.save_array(f"nll/{slug(e.key.replace('|', '__'))}.npy", res.nll)
    effective = budget_effective(policy, s.tokens, s.chunk, windows)
    return {
        **row,
        **res.summary(),
        **_budget_fields(e, effective, f"{s.tokens} tokens in chunks of {s.chunk}"),
        "policy": e.policy,
        "n_books": len(data.books),
        "nll_file": nll_file,
        "policy_table": policy.resolve(s.tokens, windows).table(),
    }


def _run_needle(e: Entry, row: dict[str, Any], data: SweepData, gates) -> dict[str, Any]:
    s, windows = data.settings.needle, data.model.cfg.layer_windows
    try:
        for c in s.contexts:
            data.policy(e, c)
    except ValueError as err:
        return {**row, "error": str(err)}
    top = data.policy(e, max(s.contexts))
    if row["memory_fraction"] is None:
        row["memory_fraction"] = round(top.memory_fraction(max(s.contexts), windows), 6)
    oracle_fn = None
    if top.needs_oracle:
        oracle_fn = ndl.needle_oracle(data.model, data.settings.tau, data.tokenizer)
    res = ndl.evaluate_needle(
        data.model,
        data.tokenizer,
        functools.partial(data.policy, e),
        data.prompts,
        chunk=s.chunk,
        max_new_tokens=s.max_new_tokens,
        gates=gates,
        probe_gates=gates if e.policy == "full" else None,  # needle scores: full cache
        oracle_fn=oracle_fn,
        progress=data.progress,
        name=e.policy,
    )
    summary = res.summary()
    mem = summary.pop("memory_actual")
    full_at = [c for c in s.contexts if not budget_effective(data.policy(e, c), c, 1, windows)]
    return {
        **row,
        **summary,
        **_budget_fields(e, not full_at, f"context {', '.join(map(str, full_at))}"),
        "policy": e.policy,
        "needle_accuracy": res.accuracy,
        "memory_actual": float(np.mean(list(mem.values()))),
        "memory_by_context": mem,
        "protocol": f"prefill in chunks of {s.chunk}, question fed after the haystack",
        "policy_table": top.resolve(max(s.contexts), windows).table(),
    }


def _budget_fields(e: Entry, effective: bool, where: str) -> dict[str, Any]:
    """budget_effective, and a note when a budget below the full cache had no effect (every
    layer kept every token any query read, at `where`): its result is the full cache's."""
    note = None
    if not effective and (e.memory_fraction is None or e.memory_fraction < 1):
        note = (
            f"budget not in effect at {where}: every layer keeps all the tokens a query "
            "reads, so this is the full cache's result"
        )
    return {"budget_effective": effective, "note": note}

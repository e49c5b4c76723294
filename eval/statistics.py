"""What the report says about a sweep's result rows: the (policy, memory) summary, gap closed
towards the oracle, and paired bootstrap intervals of the hybrids' perplexity.

gap_closed = (ppl_window - ppl_X) / (ppl_window - ppl_oracle) at every budget; for the hybrid
policies also the paired bootstrap 95% interval of the relative perplexity difference against
full and window (eval.perplexity.paired_bootstrap over tokens). See docs/design.md
(evaluation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from train.policy_names import CALIBRATED, EXPIRY, MASK, base_name

from . import perplexity as ppl_mod
from .result_store import ResultStore
from .sweep_settings import DEFAULT_POLICIES

HYBRIDS = ("hybrid", CALIBRATED, "hybrid" + MASK, CALIBRATED + MASK, CALIBRATED + EXPIRY)

Row = dict[str, Any]  # one line of results.jsonl


def summary_rows(rows: Sequence[Row]) -> list[Row]:
    """One row per (policy, memory fraction) with ppl and needle_accuracy side by side."""
    merged: dict[tuple[str, float], Row] = {}
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
                "note": None,
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
        if r.get("note"):  # the budget had no effect (eval/sweep.py)
            m["note"] = "; ".join(filter(None, (m["note"], f"{r['task']}: {r['note']}")))
    return [merged[k] for k in sorted(merged, key=lambda k: (policy_order(k[0]), k[1] or 0))]


def policy_order(name: str) -> tuple[int, str]:
    """Sort key of policy names: the sweep's default order, then others by name."""
    base = base_name(name)
    n = len(DEFAULT_POLICIES)
    return (DEFAULT_POLICIES.index(base) if base in DEFAULT_POLICIES else n, name)


def is_oracle(name: str) -> bool:
    return base_name(name) == "oracle"


def ppl_by_entry(rows: Sequence[Row]) -> dict[tuple[str, float], Row]:
    """The perplexity rows that have a perplexity, by (policy, memory fraction)."""
    return {
        (r["policy"], r["memory_fraction"]): r
        for r in rows
        if r["task"] == "ppl" and r.get("ppl") is not None
    }


def budgets(rows: Sequence[Row]) -> list[float]:
    """The memory fractions of `rows`, ascending (a fixed table's None left out)."""
    return sorted({r["memory_fraction"] for r in rows if r["memory_fraction"] is not None})


def best_oracle(by: dict[tuple[str, float], Row], mf: float) -> Row | None:
    """The oracle row (with or without expiry masking) of lowest perplexity at budget mf."""
    rows = [r for (p, m), r in by.items() if m == mf and is_oracle(p)]
    return min(rows, key=lambda r: (r["ppl"], r["policy"])) if rows else None


def gap_closed(ppl_window: float, ppl_x: float, ppl_oracle: float) -> float | None:
    """(ppl_window - ppl_x) / (ppl_window - ppl_oracle); None when the oracle is no better
    than the window (no gap to close: the ratio would be meaningless)."""
    den = ppl_window - ppl_oracle
    if not math.isfinite(den) or den < 1e-12:
        return None
    return (ppl_window - ppl_x) / den


def comparisons(store: ResultStore, rows: Sequence[Row], n_boot: int = 1000) -> list[Row]:
    """At every budget, for each hybrid policy: gap_closed and the paired bootstrap of its
    relative perplexity difference vs full and vs window (95% interval over tokens)."""
    by = ppl_by_entry(rows)
    full = by.get(("full", 1.0))
    out = []
    for mf in sorted({mf for (_, mf) in by if mf is not None and mf < 1.0}):
        window, oracle = by.get(("window", mf)), best_oracle(by, mf)
        for name in HYBRIDS:
            h = by.get((name, mf))
            if h is None:
                continue
            c: Row = {"memory_fraction": mf, "policy": name, "ppl": h["ppl"]}
            c["oracle_policy"] = oracle["policy"] if oracle else None
            c["gap_closed"] = (
                gap_closed(window["ppl"], h["ppl"], oracle["ppl"]) if window and oracle else None
            )
            nll_h_BT = store.load_array(h["nll_file"])
            for ref_name, ref in (("full", full), ("window", window)):
                c[f"vs_{ref_name}"] = (
                    ppl_mod.paired_bootstrap(
                        nll_h_BT, store.load_array(ref["nll_file"]), n_boot=n_boot
                    )
                    if ref
                    else None
                )
            out.append(c)
    return out


def layer_score_rows(needle_rows: Sequence[Row]) -> tuple[Row | None, Row | None]:
    """(the first needle row in policy order with gate needle scores per layer, the first
    with true ones), either None when no row has them."""
    gate_row = next(
        (
            r
            for r in sorted(needle_rows, key=lambda r: policy_order(r["policy"]))
            if r.get("layer_needle_score")
        ),
        None,
    )
    true_row = next((r for r in needle_rows if r.get("true_layer_needle_score")), None)
    return gate_row, true_row

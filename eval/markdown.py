"""The markdown text of a sweep's report: the configuration header, the perplexity and needle
tables, the hybrids' comparisons, failed entries and every policy table used.

Pure functions of the stored config and result rows (eval/statistics.py computes the
comparisons; eval/plots.py draws the PNGs it links). See docs/design.md (evaluation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from smartkv_jax.jsonio import dumps

from .statistics import (
    Row,
    best_oracle,
    budgets,
    gap_closed,
    is_oracle,
    layer_score_rows,
    policy_order,
    ppl_by_entry,
)


def pct(x: float | None) -> str:
    """A fraction as a percentage with 3 significant digits ("12.5%"), or "n/a"."""
    return "n/a" if x is None else f"{100 * x:.3g}%"


def num(x: float | None, fmt: str = ".3f") -> str:
    """`x` formatted, or "n/a" when missing or not finite."""
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def ci(b: dict[str, Any] | None) -> str:
    """A paired bootstrap result as "+1.23% [+0.50, +2.00]", or "n/a"."""
    if not b:
        return "n/a"
    return f"{100 * b['rel_diff']:+.2f}% [{100 * b['lo']:+.2f}, {100 * b['hi']:+.2f}]"


def render_report(
    config: dict[str, Any],
    rows: Sequence[Row],
    comps: Sequence[Row],
    plots: dict[str, str],
    n_boot: int,
) -> str:
    """report.md from the stored config, all result rows, their comparisons
    (statistics.comparisons) and the PNGs drawn ({label: file name})."""
    lines = _header(config, n_boot)
    ppl_rows = [r for r in rows if r["task"] == "ppl"]
    needle_rows = [r for r in rows if r["task"] == "needle"]
    if ppl_rows:
        lines += ["", "## Perplexity", ""]
        lines += _ppl_table(ppl_rows)
        lines += _comparisons_table(comps)
        lines += [""] + [f"![{k}]({v})" for k, v in plots.items() if k.startswith("ppl")]
    if needle_rows:
        lines += ["", "## Needle in a haystack", ""]
        lines += _needle_table(needle_rows)
        lines += [""] + [f"![{k}]({v})" for k, v in plots.items() if k.startswith("needle:")]
        lines += _layer_scores(needle_rows)
        if "layers" in plots:
            lines += ["", f"![per-layer needle scores]({plots['layers']})"]
    lines += _listed(rows, "error", "Entries that could not run")
    lines += _listed(rows, "note", "Budgets not in effect")
    lines += _policy_tables(rows)
    return "\n".join(lines).rstrip() + "\n"


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
    lines.append(f"- gates: {dumps(g, sort_keys=True) if g else 'none'}")
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


def _ppl_table(ppl_rows: Sequence[Row]) -> list[str]:
    by = ppl_by_entry(ppl_rows)
    fractions = [b for b in budgets(ppl_rows) if b < 1.0]
    window = {mf: r["ppl"] for (p, mf), r in by.items() if p == "window"}
    oracle = {mf: best_oracle(by, mf)["ppl"] for mf in fractions if best_oracle(by, mf)}
    full = by.get(("full", 1.0))
    out = []
    if full:
        out.append(f"full cache: ppl **{full['ppl']:.3f}** ({full['protocol']})")
        out.append("")
    out += [
        "perplexity (memory measured) / gap closed vs window -> oracle (the better of oracle "
        "and oracle:mask when both ran)",
        "",
        "| policy | " + " | ".join(pct(b) for b in fractions) + " |",
        "|---|" + "---|" * len(fractions),
    ]
    for p in sorted({p for (p, _) in by if p != "full"}, key=policy_order):
        cells = []
        for b in fractions:
            r = by.get((p, b))
            if r is None:
                cells.append("")
                continue
            g = None
            if b in window and b in oracle and p != "window" and not is_oracle(p):
                g = gap_closed(window[b], r["ppl"], oracle[b])
            gtxt = f" / {g:+.2f}" if g is not None else ""
            cells.append(f"{r['ppl']:.3f} ({pct(r['memory_actual'])}){gtxt}")
        out.append(f"| {p} | " + " | ".join(cells) + " |")
    return out


def _comparisons_table(comps: Sequence[Row]) -> list[str]:
    if not comps:
        return []
    out = [
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
        out.append(
            f"| {pct(c['memory_fraction'])} | {c['policy']} | {num(c['ppl'])} | "
            f"{num(c['gap_closed'])} ({c['oracle_policy'] or 'none'}) | "
            f"{ci(c['vs_full'])} | {ci(c['vs_window'])} |"
        )
    return out


def _needle_table(needle_rows: Sequence[Row]) -> list[str]:
    ok = [r for r in needle_rows if r.get("needle_accuracy") is not None]
    fractions = [b for b in budgets(ok) if b < 1.0]
    by = {(r["policy"], r["memory_fraction"]): r for r in ok}
    full = by.get(("full", 1.0))
    out = []
    if full:
        out += [f"full cache: accuracy **{full['needle_accuracy']:.2f}**", ""]
    out += [
        "accuracy (exact 7-digit match) over all contexts and depths",
        "",
        "| policy | " + " | ".join(pct(b) for b in fractions) + " |",
        "|---|" + "---|" * len(fractions),
    ]
    for p in sorted({p for (p, _) in by if p != "full"}, key=policy_order):
        cells = [
            num(by[(p, b)]["needle_accuracy"], ".2f") if (p, b) in by else "" for b in fractions
        ]
        out.append(f"| {p} | " + " | ".join(cells) + " |")
    if full:
        out += _full_needle_cells(full["cells"])
    return out


def _full_needle_cells(cells: Sequence[Row]) -> list[str]:
    """The full cache's accuracy per context and its first answers."""
    ctxs = sorted({c["context"] for c in cells})
    per_context = (
        f"{c}: {np.mean([x['correct'] for x in cells if x['context'] == c]):.2f}" for c in ctxs
    )
    sample = cells[: min(3, len(cells))]
    return [
        "",
        "full cache accuracy per context: " + ", ".join(per_context),
        "",
        "full-cache answers (first prompts): "
        + "; ".join(f"{x['number']} -> {x['answer']!r}" for x in sample),
    ]


def _layer_scores(needle_rows: Sequence[Row]) -> list[str]:
    gate_row, true_row = layer_score_rows(needle_rows)
    if gate_row is None and true_row is None:
        return []
    gs_LK = np.asarray(gate_row["layer_needle_score"]) if gate_row else None
    ts_LK = np.asarray(true_row["true_layer_needle_score"]) if true_row else None
    n = len(gs_LK if gs_LK is not None else ts_LK)
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
        g = f"{gs_LK[layer].mean():.2f} [{gs_LK[layer].max():.2f}]" if gs_LK is not None else "n/a"
        t = f"{ts_LK[layer].mean():.2f} [{ts_LK[layer].max():.2f}]" if ts_LK is not None else "n/a"
        out.append(f"| {layer} | {g} | {t} |")
    return out


def _listed(rows: Sequence[Row], field: str, title: str) -> list[str]:
    """A section listing `field` of every row that has it, by key (none: no section)."""
    hits = sorted((r for r in rows if r.get(field)), key=lambda r: r["key"])
    if not hits:
        return []
    return ["", f"## {title}", ""] + [f"- {r['key']}: {r[field]}" for r in hits]


def _policy_tables(rows: Sequence[Row]) -> list[str]:
    """Each distinct policy table once, after the keys of the entries that used it."""
    tables: dict[str, list[str]] = {}
    for r in sorted(
        rows, key=lambda r: (r["task"], policy_order(r["policy"]), r["memory_fraction"] or 0)
    ):
        if r.get("policy_table"):
            tables.setdefault(r["policy_table"], []).append(r["key"])
    if not tables:
        return []
    lines = ["", "## Policy tables", ""]
    for table, keys in tables.items():
        lines += [f"{', '.join(keys)}:", "", table, ""]
    return lines

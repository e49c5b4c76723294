"""The RULER report: the average per policy and budget (with its 95% interval and its share
of the full cache's), per-task scores and the time per sample (markdown), and the average
score against memory (PNG), written into the results directory."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from smartkv_jax.jsonio import write_text_atomic

from .markdown import num, pct
from .plots import _pyplot, _save
from .ruler import FULL_KEY, compare_runs, paired_gaps, split_cell, summarize


def _cells(summary: dict[str, Any], length: int) -> list[str]:
    """Cells at `length`, by policy (first seen order) then memory."""
    cells = [c for (n, c) in summary["average"] if n == length]
    order = {p: i for i, p in enumerate(dict.fromkeys(split_cell(c)[0] for c in cells))}
    return sorted(cells, key=lambda c: (order[split_cell(c)[0]], split_cell(c)[1]))


def ruler_markdown(rows: Sequence[dict[str, Any]], protocol: str) -> str:
    """Markdown tables: the average per cell, then the per-task scores, per length."""
    s = summarize(rows)
    lines = [f"# RULER ({protocol})", ""]
    for length in sorted({n for (n, _) in s["average"]}):
        cells = _cells(s, length)
        tasks = sorted({t for (n, _, t) in s["per_task"] if n == length})
        samples = sorted({s["samples"][length, c, t] for c in cells for t in tasks})
        lines += [f"## {length} tokens ({'/'.join(map(str, samples))} samples per task)", ""]
        lines += _average_lines(s, length, cells)
        lines += ["", "| policy | budget | " + " | ".join(tasks) + " |"]
        lines.append("|---|---:|" + "---:|" * len(tasks))
        for c in cells:
            p, m = split_cell(c)
            vals = [s["per_task"].get((length, c, t)) for t in tasks]
            shown = ["" if v is None else f"{v:.0f}" for v in vals]
            lines.append(f"| {p} | {pct(m)} | " + " | ".join(shown) + " |")
        for ours in dict.fromkeys(p for p, _ in map(split_cell, cells) if p.startswith("hybrid")):
            title = f"{ours} minus each policy, paired on the same samples (± 95%):"
            lines += _gap_lines(paired_gaps(rows, ours, length), title)
        lines += ["", *_time_lines([r for r in rows if r["length"] == length]), ""]
    return "\n".join(lines)


def _average_lines(s: dict[str, Any], length: int, cells: list[str]) -> list[str]:
    """The average per cell, its 95% interval's half-width (1.96 standard errors over the
    samples) and its share of the full cache's average."""
    full = s["average"].get((length, FULL_KEY))
    lines = [
        "| policy | budget | memory | average | ± (95%) | of full |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for c in cells:
        p, m = split_cell(c)
        avg = s["average"][length, c]
        share = pct(avg / full) if full else "n/a"
        lines.append(
            f"| {p} | {pct(m)} | {pct(s['memory'][length, c])} | {avg:.1f} | "
            f"{num(1.96 * s['stderr'][length, c], '.1f')} | {share} |"
        )
    return lines


def _gap_lines(gaps: dict[tuple[str, float], tuple[float, float]], title: str) -> list[str]:
    """A table of `paired_gaps` (a policy per line, a budget per column, each gap with its
    95% interval's half-width) under `title`, after a blank line; none without gaps."""
    if not gaps:
        return []
    budgets = sorted({m for _, m in gaps})
    lines = ["", title, ""]
    lines += ["| policy | " + " | ".join(pct(m) for m in budgets) + " |"]
    lines.append("|---|" + "---:|" * len(budgets))
    for policy in dict.fromkeys(p for p, _ in gaps):
        cells = [gaps.get((policy, m)) for m in budgets]
        shown = ["" if g is None else f"{g[0]:+.1f} ± {num(1.96 * g[1], '.1f')}" for g in cells]
        lines.append(f"| {policy} | " + " | ".join(shown) + " |")
    return lines


def comparison_markdown(
    rows: Sequence[dict[str, Any]], against: Sequence[dict[str, Any]], label: str
) -> str:
    """Each policy of `rows` (full and oracles aside) minus each policy of `against`, another
    run of the same samples (named `label`), paired on the samples both hold, per length."""
    keys = {r["key"] for r in against}
    lines = []
    for (length, ours), gaps in compare_runs(rows, against).items():
        shared = sum(r["key"] in keys for r in rows if r["length"] == length)
        title = (
            f"{length} tokens: {ours} minus each policy of {label}, paired on the {shared} "
            "samples both runs hold (± 95%):"
        )
        lines += _gap_lines(gaps, title)
    return "\n".join(lines[1:])


def _time_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Wall time per sample by task (each sample: its prefill, every cell's compression and
    answer), the prefill part apart, and the run's total."""
    lines = ["Wall time per sample, and the part spent prefilling the context:", ""]
    lines += ["| task | samples | s per sample | prefill s |", "|---|---:|---:|---:|"]
    by_task: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_task.setdefault(r["task"], []).append(r)
    for task, group in [*sorted(by_task.items()), ("all", list(rows))]:
        secs, pre = (np.mean([r[k] for r in group]) for k in ("seconds", "prefill_s"))
        lines.append(f"| {task} | {len(group)} | {secs:.1f} | {pre:.1f} |")
    total = sum(r["seconds"] for r in rows) / 60
    return [*lines, "", f"{len(rows)} samples in {total:.1f} min of sample time."]


def ruler_plot(rows: Sequence[dict[str, Any]], out_dir: Path, length: int) -> str:
    """Average score against memory at `length`, one line per policy; returns the file name."""
    s = summarize(rows)
    fig, ax = _pyplot().subplots(figsize=(7, 4.5))
    by: dict[str, list[tuple[float, float]]] = {}
    for c in _cells(s, length):
        by.setdefault(split_cell(c)[0], []).append(
            (s["memory"][length, c], s["average"][length, c])
        )
    for p, pts in by.items():
        if p == "full":
            ax.axhline(pts[0][1], color="k", ls="--", label="full")
        else:
            ax.plot(*zip(*sorted(pts)), marker="o", label=p)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("KV memory (fraction of the native cache)")
    ax.set_ylabel("average RULER score")
    ax.set_title(f"RULER at {length} tokens")
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, out_dir / f"ruler_{length}.png", dpi=110)


def write_ruler_report(out_dir: Path, rows: Sequence[dict[str, Any]], protocol: str) -> Path:
    """ruler_report.md with a plot per length, in `out_dir`."""
    text = ruler_markdown(rows, protocol)
    for length in sorted({r["length"] for r in rows}):
        text += f"\n![RULER at {length}]({ruler_plot(rows, out_dir, length)})\n"
    path = out_dir / "ruler_report.md"
    write_text_atomic(path, text)
    return path

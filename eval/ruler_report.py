"""The RULER report: per-task scores and the average per policy and budget (markdown), and
the average score against memory (PNG), written into the results directory."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from smartkv_jax.jsonio import write_text_atomic

from .markdown import pct
from .plots import _pyplot, _save
from .ruler import split_cell, summarize


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
        lines += ["| policy | budget | memory | average |", "|---|---:|---:|---:|"]
        for c in cells:
            p, m = split_cell(c)
            lines.append(
                f"| {p} | {pct(m)} | {pct(s['memory'][length, c])} | "
                f"{s['average'][length, c]:.1f} |"
            )
        lines += ["", "| policy | budget | " + " | ".join(tasks) + " |"]
        lines.append("|---|---:|" + "---:|" * len(tasks))
        for c in cells:
            p, m = split_cell(c)
            vals = [s["per_task"].get((length, c, t)) for t in tasks]
            shown = ["" if v is None else f"{v:.0f}" for v in vals]
            lines.append(f"| {p} | {pct(m)} | " + " | ".join(shown) + " |")
        lines.append("")
    return "\n".join(lines)


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

"""Write a sweep's report: report.md and its PNGs, from the results directory alone.

The report is a pure function of the stored files (eval/result_store.py), so an interrupted
and resumed sweep writes the same report as an uninterrupted one. See docs/design.md
(evaluation).
"""

from __future__ import annotations

import os
from pathlib import Path

from smartkv_jax.jsonio import write_text_atomic

from .markdown import render_report
from .plots import draw_plots
from .result_store import ResultStore
from .statistics import comparisons

REPORT_FILE = "report.md"


def write_report(out_dir: str | os.PathLike, *, n_boot: int = 1000) -> Path:
    """Write report.md and its PNGs from the results in `out_dir`; returns report.md."""
    store = ResultStore(out_dir)
    rows = store.rows()
    ppl_rows = [r for r in rows if r["task"] == "ppl"]
    needle_rows = [r for r in rows if r["task"] == "needle"]
    plots = draw_plots(store, ppl_rows, needle_rows)
    comps = comparisons(store, rows, n_boot) if ppl_rows else []
    path = store.dir / REPORT_FILE
    write_text_atomic(path, render_report(store.config(), rows, comps, plots, n_boot))
    return path

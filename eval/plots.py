"""The report's PNGs (matplotlib, Agg): perplexity vs memory, NLL per position, a needle
accuracy grid per policy and the per-layer needle scores.

Drawn without a software version in the PNG metadata, so the same results give the same
bytes. See docs/design.md (evaluation).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import perplexity as ppl_mod
from .markdown import pct
from .result_store import ResultStore, slug
from .statistics import Row, budgets, layer_score_rows, policy_order, ppl_by_entry

_METADATA = {"Software": None}  # no version string: same inputs, same bytes


def draw_plots(
    store: ResultStore, ppl_rows: Sequence[Row], needle_rows: Sequence[Row]
) -> dict[str, str]:
    """Draw the report's PNGs into the store; returns {label: file name}, in report order."""
    made: dict[str, str] = {}
    by = ppl_by_entry(ppl_rows)
    if by:
        made["ppl vs memory"] = _ppl_vs_memory(store.dir, by)
        fractions = [b for b in budgets(ppl_rows) if b < 1.0]
        if fractions:
            made["ppl per position"] = _ppl_vs_position(store, by, fractions[0])
    ok = [r for r in needle_rows if r.get("cells")]
    for p in sorted({r["policy"] for r in ok}, key=policy_order):
        rows = sorted((r for r in ok if r["policy"] == p), key=lambda r: r["memory_fraction"])
        made[f"needle: {p}"] = _needle_grids(store.dir, p, rows)
    gate_row, true_row = layer_score_rows(needle_rows)
    if gate_row or true_row:
        made["layers"] = _needle_layers(store.dir, gate_row, true_row)
    return made


def _pyplot():
    """matplotlib.pyplot on the Agg backend (imported when the first plot is drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, dpi: int, tight: bool = True) -> str:
    """Write `fig` to `path` and close it; returns the file name."""
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=dpi, metadata=_METADATA)
    _pyplot().close(fig)
    return path.name


def _ppl_vs_memory(out_dir: Path, by: dict[tuple[str, float], Row]) -> str:
    fig, ax = _pyplot().subplots(figsize=(7, 4.5))
    for p in sorted({p for (p, _) in by if p != "full"}, key=policy_order):
        pts = sorted((r["memory_actual"], r["ppl"]) for (q, _), r in by.items() if q == p)
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=p)
    if ("full", 1.0) in by:
        ax.axhline(by[("full", 1.0)]["ppl"], color="k", ls="--", label="full")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("KV memory (fraction of the full cache)")
    ax.set_ylabel("perplexity")
    ax.set_title("Streaming perplexity vs memory")
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, out_dir / "ppl_vs_memory.png", dpi=110)


def _ppl_vs_position(store: ResultStore, by: dict[tuple[str, float], Row], fraction: float) -> str:
    """NLL per position of every policy at `fraction` memory, and of the full cache."""
    fig, ax = _pyplot().subplots(figsize=(7, 4.5))
    for (p, mf), r in sorted(by.items(), key=lambda kv: policy_order(kv[0][0])):
        if mf != fraction and p != "full":
            continue
        nll_BT = store.load_array(r["nll_file"])
        x, y = ppl_mod.binned_curve(ppl_mod.position_curve(nll_BT))
        ax.plot(x, y, label=p, lw=1.2, ls="--" if p == "full" else "-")
    ax.set_xlabel("position (tokens)")
    ax.set_ylabel("NLL (nats, mean over books)")
    ax.set_title(f"NLL per position at {pct(fraction)} memory")
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, store.dir / "ppl_vs_position.png", dpi=110)


def _needle_grids(out_dir: Path, policy: str, rows: Sequence[Row]) -> str:
    """One context x depth accuracy grid per budget of `policy`, side by side."""
    fig, axes = _pyplot().subplots(
        1, len(rows), figsize=(3.2 * len(rows) + 0.8, 3.2), squeeze=False
    )
    for ax, r in zip(axes[0], rows):
        ctxs = sorted({c["context"] for c in r["cells"]})
        deps = sorted({c["depth"] for c in r["cells"]})
        grid_CD = np.full((len(ctxs), len(deps)), np.nan)
        for c in r["cells"]:
            grid_CD[ctxs.index(c["context"]), deps.index(c["depth"])] = c["correct"]
        im = ax.imshow(grid_CD, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
        ax.set_xticks(range(len(deps)), [f"{round(100 * d)}" for d in deps], fontsize=7)
        ax.set_yticks(range(len(ctxs)), [str(c) for c in ctxs], fontsize=7)
        ax.set_xlabel("depth (%)")
        ax.set_title(f"{pct(r['memory_fraction'])}: {r['needle_accuracy']:.2f}", fontsize=9)
    axes[0][0].set_ylabel("context (tokens)")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    fig.suptitle(f"needle accuracy: {policy}", fontsize=10)
    return _save(fig, out_dir / f"needle_{slug(policy)}.png", dpi=100, tight=False)


def _needle_layers(out_dir: Path, gate_row: Row | None, true_row: Row | None) -> str:
    fig, ax = _pyplot().subplots(figsize=(7, 3.8))
    for row, key, label in (
        (gate_row, "layer_needle_score", "gate prediction"),
        (true_row, "true_layer_needle_score", "true (labels)"),
    ):
        if row:
            s_LK = np.asarray(row[key])
            ax.plot(s_LK.mean(axis=1), marker="o", label=f"{label}, mean over heads")
            ax.plot(s_LK.max(axis=1), ls=":", label=f"{label}, max head")
    ax.set_xlabel("layer")
    ax.set_ylabel("needle score (log4 lifespan)")
    ax.set_title("Per-layer needle scores")
    ax.legend(fontsize=7)
    return _save(fig, out_dir / "needle_layers.png", dpi=110)

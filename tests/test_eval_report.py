"""Sweeps and the report end to end on a tiny model: an interrupted and resumed sweep gives
the same results, report and PNGs as an uninterrupted one; changed settings are refused."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from eval.report import REPORT_FILE, write_report
from eval.result_store import RESULTS_FILE, ConfigMismatchError, ResultStore
from eval.statistics import comparisons
from eval.sweep import run_sweep
from eval.sweep_settings import NeedleSettings, PerplexitySettings, SweepSettings
from smartkv_jax.gates import GateConfig, init_gates

from .test_eval_needle import CFG, CharTokenizer, tiny_params, write_haystack

POLICIES = ("full", "window", "hybrid", "oracle")
PNGS = ["needle_full.png", "needle_hybrid.png", "needle_layers.png", "needle_oracle.png",
        "needle_window.png", "ppl_vs_memory.png", "ppl_vs_position.png"]  # fmt: skip


class _Stop(Exception):
    pass


def write_books(folder) -> None:
    """Two books of 80 random short words."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    words = ["tea", "the", "cat", "sat", "on", "a", "mat", "and", "then", "slept", "well"]
    for name in ("one.txt", "two.txt"):
        text = " ".join(rng.choice(words, 80)) + "."
        (folder / name).write_text(text)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    # 245 ppl tokens = needle prompt + gold answer: both oracles label one compiled shape
    root = tmp_path_factory.mktemp("eval")
    write_books(root / "books")
    write_haystack(root / "hay")
    settings = SweepSettings(
        policies=POLICIES,
        memory=(0.5,),
        tasks=("ppl", "needle"),
        n_boot=200,
        ppl=PerplexitySettings(text=str(root / "books"), books=2, tokens=245, chunk=16),
        needle=NeedleSettings(
            contexts=(240,),
            depths=(0.0, 0.5, 1.0),
            chunk=16,
            max_new_tokens=4,
            haystack=str(root / "hay"),
        ),
    )
    gcfg = GateConfig(CFG.num_layers, CFG.num_kv_heads, CFG.head_dim)
    gates = init_gates(gcfg, jax.random.PRNGKey(0))
    model = tiny_params()

    def sweep(out, on_result=None, s=settings):
        return run_sweep(
            out,
            model,
            CharTokenizer(),
            s,
            model_name="tiny",
            gates=gates,
            gates_info={"random_init": True, "seed": 0},
            progress=False,
            on_result=on_result,
        )

    full_dir = root / "uninterrupted"
    rows = sweep(full_dir)
    write_report(full_dir, n_boot=200)
    return SimpleNamespace(
        root=root, settings=settings, sweep=sweep, full_dir=full_dir, rows=rows, model=model
    )


def _strip(rows):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_interrupted_sweep_resumes_to_the_same_report(setup):
    out = setup.root / "interrupted"
    seen = []

    def stop_after_three(row):
        seen.append(row["key"])
        if len(seen) == 3:
            raise _Stop

    with pytest.raises(_Stop):
        setup.sweep(out, stop_after_three)
    assert len(ResultStore(out).rows()) == 3
    with open(out / RESULTS_FILE, "a") as f:  # a crash in the middle of a write
        f.write('{"key": "ppl|tor')
    resumed = []
    rows = setup.sweep(out, lambda r: resumed.append(r["key"]))
    assert len(resumed) == len(setup.rows) - 3 and not set(resumed) & set(seen)
    assert _strip(rows) == _strip(setup.rows)
    write_report(out, n_boot=200)
    assert (out / REPORT_FILE).read_text() == (setup.full_dir / REPORT_FILE).read_text()
    pngs = sorted(p.name for p in setup.full_dir.glob("*.png"))
    assert pngs == PNGS
    for name in pngs:
        assert (out / name).read_bytes() == (setup.full_dir / name).read_bytes(), name
    assert setup.sweep(out, lambda r: resumed.append(r["key"])) and len(resumed) == len(rows) - 3


def test_report_contents(setup):
    text = (setup.full_dir / REPORT_FILE).read_text()
    assert "model: `tiny`" in text
    assert "**chunked(16), approximate**" in text
    assert "gap closed" in text and "| 50% | hybrid |" in text
    assert "policy: hybrid\n| layers | policy |" in text
    assert "| 1-1 | gated(" in text
    assert "### Per-layer needle scores" in text and "![per-layer needle scores]" in text
    by = {(r["task"], r["policy"]): r for r in setup.rows}
    assert by[("ppl", "full")]["memory_actual"] == pytest.approx(1.0)
    assert by[("ppl", "window")]["memory_actual"] == pytest.approx(122 / 245)  # int(0.5 * 245)
    assert by[("needle", "window")]["memory_by_context"] == {"240": pytest.approx(0.5)}
    assert by[("needle", "full")]["layer_needle_score"] is not None
    assert by[("needle", "oracle")]["true_layer_needle_score"] is not None
    (c,) = comparisons(ResultStore(setup.full_dir), setup.rows, n_boot=200)
    w, o, h = (by[("ppl", p)]["ppl"] for p in ("window", "oracle", "hybrid"))
    assert c["gap_closed"] == pytest.approx((w - h) / (w - o))
    assert c["vs_full"]["lo"] <= c["vs_full"]["rel_diff"] <= c["vs_full"]["hi"]
    assert c["vs_window"]["rel_diff"] == pytest.approx(h / w - 1, rel=1e-4)


def test_changed_settings_are_refused(setup):
    other = dataclasses.replace(
        setup.settings, ppl=dataclasses.replace(setup.settings.ppl, tokens=64)
    )
    with pytest.raises(ConfigMismatchError, match="tokens"):
        setup.sweep(setup.full_dir, s=other)


def test_missing_gates_are_refused(setup, tmp_path):
    with pytest.raises(ValueError, match="need gates"):
        run_sweep(tmp_path, setup.model, CharTokenizer(), setup.settings,
                  model_name="tiny", progress=False)  # fmt: skip

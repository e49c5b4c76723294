"""Sweeps and the report: an interrupted and resumed sweep gives the same report as an
uninterrupted one; changed settings are refused; the CLI prints the JSON keys."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from eval import report as R

from .test_eval_needle import CFG, CharTokenizer, tiny_params, write_haystack

POLICIES = ("full", "window", "hybrid", "oracle")


class _Stop(Exception):
    pass


def _write_books(folder) -> None:
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
    _write_books(root / "books")
    write_haystack(root / "hay")
    settings = R.SweepSettings(
        policies=POLICIES,
        memory=(0.5,),
        tasks=("ppl", "needle"),
        n_boot=200,
        ppl=R.PerplexitySettings(text=str(root / "books"), books=2, tokens=245, chunk=16),
        needle=R.NeedleSettings(
            contexts=(240,),
            depths=(0.0, 0.5, 1.0),
            chunk=16,
            max_new_tokens=4,
            haystack=str(root / "hay"),
        ),
    )
    gates, info = R.load_eval_gates(SimpleNamespace(gates=None, random_gates=True), CFG)
    model = SimpleNamespace(cfg=CFG, params=tiny_params(), tokenizer=CharTokenizer(), source="t")

    def sweep(out, on_result=None, s=settings):
        return R.run_sweep(
            out,
            model.params,
            CFG,
            model.tokenizer,
            s,
            model_name="tiny",
            gates=gates,
            gates_info=info,
            progress=False,
            on_result=on_result,
        )

    full_dir = root / "uninterrupted"
    rows = sweep(full_dir)
    R.write_report(full_dir, n_boot=200)
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
    assert len(R.ResultStore(out).rows()) == 3
    with open(out / R.RESULTS_FILE, "a") as f:  # a crash in the middle of a write
        f.write('{"key": "ppl|tor')
    resumed = []
    rows = setup.sweep(out, lambda r: resumed.append(r["key"]))
    assert len(resumed) == len(setup.rows) - 3 and not set(resumed) & set(seen)
    assert _strip(rows) == _strip(setup.rows)
    R.write_report(out, n_boot=200)
    assert (out / "report.md").read_text() == (setup.full_dir / "report.md").read_text()
    pngs = sorted(p.name for p in setup.full_dir.glob("*.png"))
    assert pngs == ["needle_full.png", "needle_hybrid.png", "needle_layers.png",
                    "needle_oracle.png", "needle_window.png", "ppl_vs_memory.png",
                    "ppl_vs_position.png"]  # fmt: skip
    for name in pngs:
        assert (out / name).read_bytes() == (setup.full_dir / name).read_bytes(), name
    assert setup.sweep(out, lambda r: resumed.append(r["key"])) and len(resumed) == len(rows) - 3


def test_report_contents(setup):
    text = (setup.full_dir / "report.md").read_text()
    assert "model: `tiny`" in text
    assert "**chunked(16), approximate**" in text
    assert "gap closed" in text and "| 50% | hybrid |" in text
    assert "policy: hybrid\n| layers | policy |" in text
    assert "| 1-1 | gated(" in text
    by = {(r["task"], r["policy"]): r for r in setup.rows}
    assert by[("ppl", "full")]["memory_actual"] == pytest.approx(1.0)
    assert by[("ppl", "window")]["memory_actual"] == pytest.approx(122 / 245)  # int(0.5 * 245)
    assert by[("needle", "window")]["memory_by_context"] == {"240": pytest.approx(0.5)}
    assert by[("needle", "full")]["layer_needle_score"] is not None
    assert by[("needle", "oracle")]["true_layer_needle_score"] is not None
    comps = R.comparisons(R.ResultStore(setup.full_dir), setup.rows, n_boot=200)
    (c,) = comps
    w, o, h = (by[("ppl", p)]["ppl"] for p in ("window", "oracle", "hybrid"))
    assert c["gap_closed"] == pytest.approx((w - h) / (w - o))
    assert c["vs_full"]["lo"] <= c["vs_full"]["rel_diff"] <= c["vs_full"]["hi"]
    assert c["vs_window"]["rel_diff"] == pytest.approx(h / w - 1, rel=1e-4)


def test_changed_settings_are_refused(setup):
    import dataclasses

    other = dataclasses.replace(
        setup.settings, ppl=dataclasses.replace(setup.settings.ppl, tokens=64)
    )
    with pytest.raises(R.ConfigMismatchError, match="tokens"):
        setup.sweep(setup.full_dir, s=other)


def test_cli_json(setup, monkeypatch, capsys):
    monkeypatch.setattr(R, "load_model", lambda name, dtype="float32": setup.model)
    s = setup.settings
    common = ["--out", str(setup.full_dir), "--model", "tiny", "--random-gates", "--json",
              "--no-progress", "--policies", *POLICIES, "--memory", "50%"]  # fmt: skip
    argv = ["ppl", *common, "--text", s.ppl.text, "--books", "2", "--tokens", "245",
            "--chunk", "16"]  # fmt: skip
    assert R.main(argv) == 0  # every entry is stored already: nothing runs
    out = json.loads(capsys.readouterr().out)
    rows = out["results"]
    assert [r["policy"] for r in rows] == list(POLICIES)
    for r in rows:
        assert {"policy", "memory_fraction", "ppl", "needle_accuracy"} <= set(r)
        assert r["ppl"] > 0 and r["needle_accuracy"] is None
    assert R.main(["report", "--out", str(setup.full_dir), "--no-run", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["report"].endswith("report.md")
    both = [r for r in out["results"] if r["policy"] == "hybrid"][0]
    assert both["ppl"] > 0 and 0 <= both["needle_accuracy"] <= 1
    assert out["comparisons"][0]["policy"] == "hybrid"
    assert R.main(["ppl", *common, "--tokens", "64", "--text", s.ppl.text]) == 2
    assert "another ppl configuration" in capsys.readouterr().err


def test_calibrated_tables_by_budget(tmp_path):
    from smartkv_jax.policy import LayerPolicy, PolicyConfig

    for mf, cap in ((0.25, 30), (0.5, 60)):
        table = PolicyConfig.uniform(3, LayerPolicy("window", capacity=cap))
        (tmp_path / f"calib_{mf:g}.json").write_text(table.to_json())
    pattern = str(tmp_path / "calib_{mf}.json")
    pol = R.policy_for(R.CALIBRATED, 3, 240, 0.5, pattern)
    assert pol.name == R.CALIBRATED and pol.layers[0].capacity == 60
    assert R.policy_for(R.CALIBRATED, 3, 240, 0.25, pattern).layers[0].capacity == 30
    with pytest.raises(FileNotFoundError):
        R.policy_for(R.CALIBRATED, 3, 240, 0.125, pattern)
    with pytest.raises(ValueError, match="needs a label store or a policy table"):
        R.policy_for(R.CALIBRATED, 3, 240, 0.5, None)


def test_calibrated_from_a_label_store(tmp_path, monkeypatch):
    """A label store as --calibrated: the table is derived at each context and budget."""
    import train.calibrate as cal

    stats = {"q95": np.full(3, 500.0), "long_share": np.full(3, 0.3), "live": np.ones(3)}
    monkeypatch.setattr(cal, "layer_statistics", lambda path, tau: stats)
    (tmp_path / "metadata.json").write_text("{}")
    assert R.is_label_store(str(tmp_path)) and not R.is_label_store(str(tmp_path / "x.json"))
    for context, mf in ((1024, 0.25), (2048, 0.125)):
        pol = R.policy_for(R.CALIBRATED, 3, context, mf, str(tmp_path))
        assert pol.name == R.CALIBRATED and {p.kind for p in pol.layers} == {"gated"}
        assert pol.memory_fraction(context) == pytest.approx(mf, abs=0.01)
        assert {p.discount for p in pol.layers} == {0.5}
        exp = R.policy_for(R.CALIBRATED + R.EXPIRY, 3, context, mf, str(tmp_path))
        assert {p.discount for p in exp.layers} == {None}
        assert [p.capacity for p in exp.layers] == [p.capacity for p in pol.layers]
        both = R.policy_for(R.CALIBRATED + R.EXPIRY + R.MASK, 3, context, mf, str(tmp_path))
        assert {(p.discount, p.mask_expired) for p in both.layers} == {(None, True)}
    s = R.SweepSettings(policies=(R.CALIBRATED,), memory=(0.25, 0.5), calibrated=str(tmp_path))
    assert [e.key for e in R.sweep_entries(s)][:2] == [
        "ppl|hybrid-calibrated|0.25",
        "ppl|hybrid-calibrated|0.5",
    ]


def test_sweep_entries_and_gap_closed():
    s = R.SweepSettings(policies=("full", "window", R.CALIBRATED), memory=(0.25, 0.5))
    keys = [e.key for e in R.sweep_entries(s)]
    assert keys[:3] == ["ppl|full|1", "ppl|window|0.25", "ppl|window|0.5"]
    assert not any(R.CALIBRATED in k for k in keys)  # no table given
    s2 = R.SweepSettings(policies=(R.CALIBRATED,), memory=(0.25,), calibrated="t_{mf}.json")
    assert [e.key for e in R.sweep_entries(s2)] == [
        "ppl|hybrid-calibrated|0.25",
        "needle|hybrid-calibrated|0.25",
    ]
    s3 = R.SweepSettings(policies=(R.CALIBRATED,), tasks=("ppl",), calibrated="t.json")
    assert [e.key for e in R.sweep_entries(s3)] == ["ppl|hybrid-calibrated|table"]
    assert R.gap_closed(12.0, 11.0, 10.0) == pytest.approx(0.5)
    assert R.gap_closed(12.0, 11.0, 12.0) is None
    assert R.gap_closed(10.0, 11.0, 12.0) is None  # oracle worse than window: no gap
    with pytest.raises(ValueError, match="too small"):
        R.policy_for("hybrid", 30, 1024, 0.01)
    masked = R.policy_for("oracle:mask", 30, 1024, 0.25)
    assert masked.name == "oracle:mask" and masked.layers[0].capacity == 256
    assert all(p.mask_expired for p in masked.layers)
    assert not any(p.mask_expired for p in R.policy_for("oracle", 30, 1024, 0.25).layers)
    by = {("oracle", 0.5): {"policy": "oracle", "ppl": 12.0},
          ("oracle:mask", 0.5): {"policy": "oracle:mask", "ppl": 11.0}}  # fmt: skip
    assert R._best_oracle(by, 0.5)["policy"] == "oracle:mask"
    assert R._best_oracle(by, 0.25) is None

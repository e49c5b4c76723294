"""`smartkv eval ruler` on a tiny model: both protocols, resuming, the report, and the full
cache answering alike in both protocols."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import jax
import numpy as np
import pytest

import smartkv_cli.ruler
from eval import ruler as R
from eval.perplexity import oracle_scores
from eval.ruler import QUICK_TASKS, RulerRun, RulerSettings, pending, summarize
from eval.ruler_report import comparison_markdown, ruler_markdown, write_ruler_report
from eval.ruler_tasks import RulerSample
from smartkv_cli import eval as E
from smartkv_cli.main import main
from smartkv_cli.ruler import settings_from_args
from smartkv_jax.generate import generate
from smartkv_jax.model import Transformer

from .test_cli_eval import _parse
from .test_eval_needle import CFG, CharTokenizer, tiny_params

POLICIES = ["full", "window", "expected", "pyramidkv", "oracle"]


@pytest.fixture
def tiny(monkeypatch):
    cfg = dataclasses.replace(CFG, max_position=1024)
    params = jax.tree_util.tree_map(
        lambda a: a * 8 if a.ndim == 3 else a, Transformer.init_random(cfg, jax.random.PRNGKey(0))
    )
    model = SimpleNamespace(cfg=cfg, model=params, tokenizer=CharTokenizer(), source="t")
    monkeypatch.setattr(E, "load_model", lambda name, dtype="float32", mesh=None: model)


def _args(out, protocol: str) -> list[str]:
    args = ["eval", "ruler", "--model", "tiny", "--out", str(out), "--tasks", "vt"]
    args += ["--samples", "2", "--lengths", "800", "--memory", "0.25", "--fmt", "plain"]
    args += ["--protocol", protocol, "--chunk", "64", "--no-progress", "--json"]
    return [*args, "--policies", *POLICIES]


def _run(out, protocol: str, capsys, *extra) -> dict:
    assert main([*_args(out, protocol), *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_ruler_in_both_protocols(tiny, tmp_path, capsys, monkeypatch):
    reports = []  # rows each report was written from: after every sample, then at the end

    def write(out_dir, rows, protocol):
        reports.append([r["key"] for r in rows])
        return write_ruler_report(out_dir, rows, protocol)

    monkeypatch.setattr(smartkv_cli.ruler, "write_ruler_report", write)
    first = _run(tmp_path / "one", "oneshot", capsys)
    assert reports == [["vt|800|0"], ["vt|800|0", "vt|800|1"], ["vt|800|0", "vt|800|1"]]
    rows = [json.loads(line) for line in (tmp_path / "one" / "results.jsonl").open()]
    assert sorted(r["key"] for r in rows) == ["vt|800|0", "vt|800|1"]
    for r in rows:
        assert set(r["scores"]) == {"full|1", *(f"{p}|0.25" for p in POLICIES[1:])}
        assert all(0 <= s <= 100 for s in r["scores"].values())
        assert r["memory"]["full|1"] == 1.0
        assert all(abs(m - 0.25) < 0.01 for k, m in r["memory"].items() if k != "full|1")
    # a rerun finds every sample done and reports the same; so does --report-only
    assert _run(tmp_path / "one", "oneshot", capsys)["average"] == first["average"]
    only = ["eval", "ruler", "--out", str(tmp_path / "one"), "--report-only", "--json"]
    assert main(only) == 0 and json.loads(capsys.readouterr().out) == first
    assert len((tmp_path / "one" / "results.jsonl").read_text().splitlines()) == 2
    report = (tmp_path / "one" / "ruler_report.md").read_text()
    assert "| pyramidkv | 25% |" in report and (tmp_path / "one" / "ruler_800.png").is_file()
    # more samples extend the stored run, which keeps its rows; fewer are refused
    _run(tmp_path / "one", "oneshot", capsys, "--samples", "3")
    grown = [json.loads(line) for line in (tmp_path / "one" / "results.jsonl").open()]
    assert [r["key"] for r in grown] == ["vt|800|0", "vt|800|1", "vt|800|2"] and grown[:2] == rows
    assert main([*_args(tmp_path / "one", "oneshot"), "--samples", "1"]) == 2

    _run(tmp_path / "two", "streaming", capsys)
    streamed = {
        json.loads(x)["key"]: json.loads(x) for x in (tmp_path / "two" / "results.jsonl").open()
    }
    for r in rows:  # the whole cache answers alike whichever way the context was read (the
        # chunking differs, so float rounding may flip a near tie late in a long answer)
        assert streamed[r["key"]]["answers"]["full|1"][:40] == r["answers"]["full|1"][:40]
    # other settings in the same directory are refused
    assert main(["eval", "ruler", "--model", "tiny", "--out", str(tmp_path / "one"),
                 "--samples", "3", "--no-progress"]) == 2  # fmt: skip


def test_report_only_needs_a_results_directory(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "missing", tmp_path / "empty"):
        assert main(["eval", "ruler", "--out", str(out), "--report-only"]) == 2
        assert "no RULER results there" in capsys.readouterr().err
    assert not (tmp_path / "missing").exists()  # nothing created


def _ruler_settings(*argv: str) -> RulerSettings:
    return settings_from_args(_parse(["ruler", *argv]))


def test_quick_preset_yields_to_the_flags_given_beside_it():
    quick = _ruler_settings("--quick")
    assert (quick.tasks, quick.samples, quick.memory) == (QUICK_TASKS, 10, (0.125, 0.25))
    half = _ruler_settings("--quick", "--memory", "0.5", "--samples", "3")
    assert (half.tasks, half.samples, half.memory) == (QUICK_TASKS, 3, (0.5,))
    assert _ruler_settings("--quick", "--tasks", "vt").tasks == ("vt",)
    assert _ruler_settings("--quick", "--samples", "20").samples == 20  # the default, given
    assert _ruler_settings("--samples", "3") == RulerSettings(samples=3)


def test_summary_weighs_tasks_equally():
    rows = [
        {"length": 8, "task": "a", "scores": {"x|1": 100.0}, "memory": {"x|1": 1.0}},
        {"length": 8, "task": "a", "scores": {"x|1": 0.0}, "memory": {"x|1": 1.0}},
        {"length": 8, "task": "b", "scores": {"x|1": 100.0}, "memory": {"x|1": 1.0}},
    ]
    s = summarize(rows)
    assert s["per_task"][8, "x|1", "a"] == 50.0 and s["average"][8, "x|1"] == 75.0
    assert s["samples"][8, "x|1", "a"] == 2
    assert np.isnan(s["stderr"][8, "x|1"])  # task b has one sample: no variance yet


def _row(task: str, index: int, full: float, half: float, ours: float, seconds: float) -> dict:
    scores = {"full|1": full, "w|0.5": half, "hybrid-x|0.5": ours}
    return {
        "key": f"{task}|8|{index}", "task": task, "length": 8, "index": index,
        "scores": scores, "memory": {"full|1": 1.0, "w|0.5": 0.5, "hybrid-x|0.5": 0.5},
        "seconds": seconds, "prefill_s": seconds / 4,
    }  # fmt: skip


def test_report_gives_intervals_the_share_of_full_paired_gaps_and_the_time_per_sample():
    rows = [
        _row("a", 0, 100.0, 100.0, 100.0, 10.0), _row("a", 1, 100.0, 0.0, 100.0, 30.0),
        _row("b", 0, 50.0, 0.0, 50.0, 60.0), _row("b", 1, 50.0, 0.0, 0.0, 20.0),
    ]  # fmt: skip
    s = summarize(rows)
    # task a: scores 100, 0 (variance 5000, over 2 samples); task b: 0, 0; mean of 2 tasks
    assert s["average"][8, "w|0.5"] == 25.0 and s["stderr"][8, "w|0.5"] == 25.0
    text = ruler_markdown(rows, "oneshot")
    assert "| w | 50% | 50% | 25.0 | 49.0 | 33.3% |" in text  # 25 / full's 75
    assert "| full | 100% | 100% | 75.0 | 0.0 | 100% |" in text
    assert "| a | 2 | 20.0 | 5.0 |" in text and "| b | 2 | 40.0 | 10.0 |" in text
    assert "| all | 4 | 30.0 | 7.5 |" in text and "4 samples in 2.0 min" in text
    # ours minus w, sample by sample: task a 0, 100; task b 50, 0
    gap, err = R.paired_gaps(rows, "hybrid-x", 8)["w", 0.5]
    assert gap == 37.5 and err == pytest.approx(np.sqrt(2500 + 625) / 2)
    assert "| w | +37.5 ± 54.8 |" in text and "| full |" not in text.split("minus")[1]


def test_report_of_ours_beside_the_full_cache_alone_has_no_paired_table():
    rows = [_row("a", 0, 100.0, 0.0, 100.0, 10.0), _row("b", 0, 50.0, 0.0, 0.0, 20.0)]
    for r in rows:
        for cells in (r["scores"], r["memory"]):
            del cells["w|0.5"]
    text = ruler_markdown(rows, "oneshot")
    assert "| hybrid-x | 50% | 50% | 50.0 |" in text and "minus each policy" not in text


def _rerun(scores: dict[tuple[str, int], float]) -> list[dict]:
    """Rows of a second run that ran only hybrid-x at 50%, with these scores per sample."""
    rows = [_row(task, i, 0.0, 0.0, ours, 10.0) for (task, i), ours in scores.items()]
    for r in rows:
        r["scores"] = {"hybrid-x|0.5": r["scores"]["hybrid-x|0.5"]}
        r["memory"] = {"hybrid-x|0.5": 0.5}
    return rows


def test_two_runs_pair_on_the_samples_both_hold():
    first = [
        _row("a", 0, 100.0, 100.0, 100.0, 10.0), _row("a", 1, 100.0, 0.0, 100.0, 30.0),
        _row("b", 0, 50.0, 0.0, 50.0, 60.0), _row("b", 1, 50.0, 0.0, 0.0, 20.0),
    ]  # fmt: skip
    # b 2 is not in the first run, so it pairs with nothing and is left out
    second = _rerun(
        {("a", 0): 100.0, ("a", 1): 0.0, ("b", 0): 100.0, ("b", 1): 100.0, ("b", 2): 0.0}
    )
    gaps = R.paired_gaps(second, "hybrid-x", 8, against=first)
    # hybrid-x minus its namesake: task a 0, -100; task b 50, 100
    gap, err = gaps["hybrid-x", 0.5]
    assert gap == 12.5 and err == pytest.approx(np.sqrt(2500 + 625) / 2)
    # the full cache pairs at ours' budget: a 0, -100; b 50, 50. w: a 0, 0; b 100, 100
    assert gaps["full", 0.5] == (0.0, pytest.approx(25.0)) and gaps["w", 0.5][0] == 50.0
    assert set(gaps) == {("hybrid-x", 0.5), ("full", 0.5), ("w", 0.5)}
    text = comparison_markdown(second, first, "runs/first")
    assert "hybrid-x minus each policy of runs/first, paired on the 4 samples" in text
    assert "| hybrid-x | +12.5 ± 54.8 |" in text and "| w | +50.0 ± " in text


def _store(path, rows: list[dict], seed: int):
    path.mkdir()
    ruler = {"seed": seed, "fmt": "auto", "essays": None, "books": None, "protocol": "oneshot"}
    (path / "config.json").write_text(json.dumps({"model": "tiny", "ruler": ruler}))
    (path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_report_only_pairs_with_a_run_of_the_same_samples_only(tmp_path, capsys):
    _store(tmp_path / "first", [_row("a", 0, 100.0, 0.0, 50.0, 10.0)], seed=0)
    _store(tmp_path / "second", _rerun({("a", 0): 100.0}), seed=0)
    _store(tmp_path / "other_seed", _rerun({("a", 0): 100.0}), seed=1)
    only = ["eval", "ruler", "--report-only", "--json", "--against", str(tmp_path / "first")]
    assert main([*only, "--out", str(tmp_path / "second")]) == 0
    gaps = {
        (g["against"], g["budget"]): g["gap"]
        for g in json.loads(capsys.readouterr().out)["against"]
    }
    assert gaps == {("full", 0.5): 0.0, ("hybrid-x", 0.5): 50.0, ("w", 0.5): 100.0}
    assert main([*only, "--out", str(tmp_path / "other_seed")]) == 2
    err = capsys.readouterr().err
    assert "--against" in err and "seed 0 there, 1 here" in err


@pytest.mark.parametrize("protocol", ["oneshot", "streaming"])
def test_the_oracle_foresees_the_full_caches_answer(monkeypatch, protocol):
    """The oracle's lifespans come from the context, the question and the tokens the full
    cache's answer reads back (all but its last): a needle is read while answering. The
    full cache answers for it even when no full cell is asked for."""
    model = tiny_params()
    seen = []

    def spy(m, tokens, tau=0.05):
        seen.append(list(tokens))
        return oracle_scores(m, tokens, tau)

    monkeypatch.setattr(R, "oracle_scores", spy)
    settings = RulerSettings(policies=("window", "oracle"), memory=(0.5,), fmt="plain")
    settings = dataclasses.replace(settings, protocol=protocol, chunk=64)
    run = RulerRun(None, model, CharTokenizer(), settings)
    text = "".join(f"Line {i:03d} says hello. " for i in range(12))
    sample = RulerSample("vt", 0, text, "What is it?", "Answer:", ("7",), 6, "all")
    row = run.run_sample(sample, 512)
    context, question = R.sample_ids(CharTokenizer(), sample, "plain")
    full = generate(model, [question], 6, context=[context], chunk=64).tokens[0]
    assert seen == [[*context, *question, *full[:-1]]] and len(full) > 1
    assert set(row["answers"]) == {"window|0.5", "oracle|0.5"}


def test_pending_samples_go_index_first_so_a_cut_run_is_balanced():
    settings = RulerSettings(tasks=("vt", "qa"), lengths=(512, 1024), samples=2)
    got = pending(settings, {"qa|512|0", "vt|1024|1"})
    assert got == [
        ("vt", 512, 0), ("vt", 512, 1), ("qa", 512, 1),
        ("vt", 1024, 0), ("qa", 1024, 0), ("qa", 1024, 1),
    ]  # fmt: skip

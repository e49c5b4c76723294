"""`smartkv eval`: flags default to the settings dataclasses, a sweep runs and resumes from the
command line, JSON output, and changed settings exit with an error."""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import pytest

from eval import perplexity as P
from eval.sweep_settings import NeedleSettings, PerplexitySettings, SweepSettings
from smartkv_cli import eval as E
from smartkv_cli.validate import validate_args
from smartkv_jax.errors import SmartKVError

from .test_eval_needle import CFG, CharTokenizer, tiny_params, write_haystack
from .test_eval_report import write_books


def _parse(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="smartkv")
    E.add_eval_cli(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["eval", *argv])


def test_flags_default_to_the_settings():
    assert E.settings_from_args(_parse(["report"])) == SweepSettings()
    ppl = E.settings_from_args(_parse(["ppl", "--tokens", "64", "--memory", "12.5%", "0.5"]))
    assert ppl == SweepSettings(
        memory=(0.125, 0.5), tasks=("ppl",), ppl=PerplexitySettings(tokens=64)
    )
    needle = E.settings_from_args(
        _parse(["needle", "--depths", "0", "50", "--needle-chunk", "8", "--format", "plain"])
    )
    assert needle.needle == NeedleSettings(depths=(0.0, 0.5), chunk=8, fmt="plain")
    assert needle.ppl == PerplexitySettings() and needle.tasks == ("needle",)
    with pytest.raises(SmartKVError, match=r"--memory must be in \(0, 1\], got 0.0"):
        validate_args(_parse(["ppl", "--memory", "0"]))


def test_sweep_from_the_command_line(tmp_path, monkeypatch, capsys):
    write_books(tmp_path / "books")
    write_haystack(tmp_path / "hay")
    model = SimpleNamespace(cfg=CFG, model=tiny_params(), tokenizer=CharTokenizer(), source="t")
    monkeypatch.setattr(E, "load_model", lambda name, dtype="float32", mesh=None: model)
    out = str(tmp_path / "res")
    common = [
        "--out",
        out,
        "--model",
        "tiny",
        "--random-gates",
        "--json",
        "--no-progress",
        "--policies",
        "full",
        "window",
        "hybrid",
        "--memory",
        "50%",
        "--n-boot",
        "100",
    ]
    ppl = ["--text", str(tmp_path / "books"), "--books", "2", "--tokens", "245", "--chunk", "16"]
    needle = ["--haystack", str(tmp_path / "hay"), "--contexts", "240", "--depths", "0", "100",
              "--needle-chunk", "16", "--max-new-tokens", "4"]  # fmt: skip
    assert E.main(["report", *common, *ppl, *needle]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["report"].endswith("report.md") and report["comparisons"][0]["policy"] == "hybrid"
    hybrid = [r for r in report["results"] if r["policy"] == "hybrid"][0]
    assert hybrid["ppl"] > 0 and 0 <= hybrid["needle_accuracy"] <= 1

    monkeypatch.setattr(P, "evaluate_perplexity", lambda *a, **k: pytest.fail("all stored"))
    assert E.main(["ppl", *common, *ppl]) == 0
    rows = json.loads(capsys.readouterr().out)["results"]
    assert [r["policy"] for r in rows] == ["full", "window", "hybrid"]
    assert all(r["ppl"] > 0 and r["needle_accuracy"] is None for r in rows)

    assert E.main(["report", "--out", out, "--no-run"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("policy ") and "hybrid @ 50%: gap closed n/a" in text

    assert E.main(["ppl", *common, "--text", str(tmp_path / "books"), "--tokens", "64"]) == 2
    assert "another ppl configuration" in capsys.readouterr().err

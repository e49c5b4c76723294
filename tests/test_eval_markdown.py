"""Report text: number formatting and the sections a report has for what its rows hold."""

from __future__ import annotations

from eval.markdown import ci, num, pct, render_report


def test_formatting():
    assert (pct(0.125), pct(None)) == ("12.5%", "n/a")
    assert (num(1.23456), num(float("nan")), num(0.5, ".2f")) == ("1.235", "n/a", "0.50")
    assert ci({"rel_diff": 0.0123, "lo": 0.005, "hi": 0.02}) == "+1.23% [+0.50, +2.00]"
    assert ci(None) == "n/a"


def test_sections_follow_the_rows():
    config = {"model": {"name": "tiny", "config": {"num_layers": 3}}, "oracle_tau": 0.05}
    failed = {"key": "ppl|hybrid|0.01", "task": "ppl", "policy": "hybrid",
              "memory_fraction": 0.01, "ppl": None, "error": "too small"}  # fmt: skip
    window = {"key": "ppl|window|0.5", "task": "ppl", "policy": "window", "memory_fraction": 0.5,
              "ppl": 10.0, "memory_actual": 0.5, "policy_table": "policy: window"}  # fmt: skip
    text = render_report(config, [failed, window], [], {"ppl vs memory": "p.png"}, 100)
    assert text.startswith("# SmartKV-JAX evaluation report\n")
    assert "- model: `tiny` (None, 3 layers" in text and "100 resamples" in text
    assert "| window | " in text and "10.000 (50%)" in text and "![ppl vs memory](p.png)" in text
    assert "## Entries that could not run\n\n- ppl|hybrid|0.01: too small" in text
    assert text.endswith("## Policy tables\n\nppl|window|0.5:\n\npolicy: window\n")
    assert "## Needle in a haystack" not in text and "Hybrid vs baselines" not in text

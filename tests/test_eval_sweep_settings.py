"""Sweep entries: run order, full once at 1.0, hybrid-calibrated per budget or once per table."""

from __future__ import annotations

import pytest

from eval.sweep_settings import Entry, SweepSettings, sweep_entries
from train.policy_names import CALIBRATED


def _keys(**settings) -> list[str]:
    return [e.key for e in sweep_entries(SweepSettings(**settings))]


def test_entries_in_run_order():
    keys = _keys(policies=("full", "window", CALIBRATED), memory=(0.25, 0.5))
    assert keys == ["ppl|full|1", "ppl|window|0.25", "ppl|window|0.5",
                    "needle|full|1", "needle|window|0.25", "needle|window|0.5"]  # fmt: skip
    assert Entry("ppl", CALIBRATED, None).key == "ppl|hybrid-calibrated|table"


def test_calibrated_entries(tmp_path):
    per_budget = _keys(policies=(CALIBRATED,), memory=(0.25,), calibrated="t_{mf}.json")
    assert per_budget == ["ppl|hybrid-calibrated|0.25", "needle|hybrid-calibrated|0.25"]
    one_table = _keys(policies=(CALIBRATED + ":expiry",), tasks=("ppl",), calibrated="t.json")
    assert one_table == ["ppl|hybrid-calibrated:expiry|table"]
    (tmp_path / "metadata.json").write_text("{}")  # a label store: derived per budget
    store = _keys(policies=(CALIBRATED,), memory=(0.25, 0.5), calibrated=str(tmp_path))
    assert store[:2] == ["ppl|hybrid-calibrated|0.25", "ppl|hybrid-calibrated|0.5"]


def test_unknown_task_is_refused():
    with pytest.raises(ValueError, match="unknown task 'bleu'"):
        _keys(tasks=("bleu",))

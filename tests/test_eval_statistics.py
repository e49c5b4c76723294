"""Report statistics on synthetic result rows: the merged summary, gap closed towards the
best oracle, and the hybrids' paired bootstrap comparisons."""

from __future__ import annotations

import numpy as np
import pytest

from eval.result_store import ResultStore
from eval.statistics import (
    best_oracle,
    comparisons,
    gap_closed,
    layer_score_rows,
    policy_order,
    ppl_by_entry,
    summary_rows,
)


def _ppl(policy, mf, ppl, nll_file=None):
    return {"task": "ppl", "policy": policy, "memory_fraction": mf, "ppl": ppl,
            "memory_actual": mf, "protocol": "exact", "nll_file": nll_file}  # fmt: skip


def test_gap_closed_and_best_oracle():
    assert gap_closed(12.0, 11.0, 10.0) == pytest.approx(0.5)
    assert gap_closed(12.0, 11.0, 12.0) is None
    assert gap_closed(10.0, 11.0, 12.0) is None  # oracle worse than window: no gap
    by = ppl_by_entry([_ppl("oracle", 0.5, 12.0), _ppl("oracle:mask", 0.5, 11.0)])
    assert best_oracle(by, 0.5)["policy"] == "oracle:mask"
    assert best_oracle(by, 0.25) is None


def test_summary_rows_merge_tasks_in_policy_order():
    needle = {"task": "needle", "policy": "window", "memory_fraction": 0.5,
              "needle_accuracy": 0.75, "memory_actual": 0.5}  # fmt: skip
    failed = {"task": "needle", "policy": "hybrid", "memory_fraction": 0.5, "error": "too small"}
    rows = [_ppl("custom.json", 0.5, 9.0), needle, _ppl("window", 0.5, 10.0), failed]
    out = summary_rows(rows)
    assert [r["policy"] for r in out] == ["window", "hybrid", "custom.json"]
    assert (out[0]["ppl"], out[0]["needle_accuracy"]) == (10.0, 0.75)
    assert out[1]["error"] == "too small" and out[1]["ppl"] is None
    assert policy_order("oracle:mask") < policy_order("zzz") and policy_order("full")[0] == 0


def test_comparisons_of_the_hybrids(tmp_path):
    store = ResultStore(tmp_path)
    rng = np.random.default_rng(0)
    base_BT = rng.uniform(1, 3, (2, 50))
    rows = []
    for policy, mf, shift in (("full", 1.0, 0.0), ("window", 0.5, 0.3),
                              ("oracle", 0.5, 0.1), ("hybrid", 0.5, 0.2)):  # fmt: skip
        name = store.save_array(f"nll/{policy}.npy", base_BT + shift)
        rows.append(_ppl(policy, mf, float(np.exp((base_BT + shift).mean())), name))
    (c,) = comparisons(store, rows, n_boot=100)
    assert c["policy"] == "hybrid" and c["oracle_policy"] == "oracle"
    assert c["gap_closed"] == pytest.approx(
        (np.exp(0.3) - np.exp(0.2)) / (np.exp(0.3) - np.exp(0.1))
    )
    assert c["vs_full"]["rel_diff"] == pytest.approx(np.exp(0.2) - 1)
    assert c["vs_window"]["rel_diff"] == pytest.approx(np.exp(-0.1) - 1)


def test_layer_score_rows():
    rows = [{"policy": "window", "layer_needle_score": [[1.0]]},
            {"policy": "full", "layer_needle_score": [[2.0]]},
            {"policy": "oracle", "true_layer_needle_score": [[3.0]]}]  # fmt: skip
    gate_row, true_row = layer_score_rows(rows)
    assert (gate_row["policy"], true_row["policy"]) == ("full", "oracle")
    assert layer_score_rows([]) == (None, None)

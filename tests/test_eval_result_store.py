"""The results directory: append-only rows that survive a torn last line, refused config
changes, atomic arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest

from eval.result_store import (
    CONFIG_FILE,
    RESULTS_FILE,
    ConfigMismatchError,
    ResultStore,
    jsonable,
    slug,
)


def test_rows_survive_a_torn_last_line(tmp_path):
    store = ResultStore(tmp_path / "res")
    store.append({"key": "a", "x": np.float32(1.5)})
    with open(store.dir / RESULTS_FILE, "a") as f:
        f.write('{"key": "b", "x"')  # a crash in the middle of a write
    assert store.rows() == [{"key": "a", "x": 1.5}]
    store.append({"key": "c", "x": math.inf})
    assert [r["key"] for r in store.rows()] == ["a", "c"]
    assert store.done()["c"] == {"key": "c", "x": None}


def test_config_sections_are_filled_once_and_then_checked(tmp_path):
    store = ResultStore(tmp_path)
    store.check_config("ppl", None)  # unset: nothing recorded
    assert not (tmp_path / CONFIG_FILE).exists()
    store.check_config("ppl", {"tokens": 245, "books": (1, 2)})
    store.check_config("ppl", {"tokens": 245, "books": [1, 2]})
    assert store.config() == {"ppl": {"tokens": 245, "books": [1, 2]}}
    with pytest.raises(ConfigMismatchError, match=r"another ppl configuration \(tokens: 245 -> 64"):
        store.check_config("ppl", {"tokens": 64, "books": [1, 2]})


def test_growable_keys_may_only_grow(tmp_path):
    store = ResultStore(tmp_path)
    store.check_config("ruler", {"samples": 3, "seed": 0}, growable=("samples",))
    store.check_config("ruler", {"samples": 5, "seed": 0}, growable=("samples",))
    assert store.config() == {"ruler": {"samples": 5, "seed": 0}}
    for other in ({"samples": 4, "seed": 0}, {"samples": 6, "seed": 1}):
        with pytest.raises(ConfigMismatchError, match="another ruler configuration"):
            store.check_config("ruler", other, growable=("samples",))
    with pytest.raises(ConfigMismatchError):  # not growable unless asked
        store.check_config("ruler", {"samples": 6, "seed": 0})
    assert store.config() == {"ruler": {"samples": 5, "seed": 0}}


def test_arrays_and_names(tmp_path):
    store = ResultStore(tmp_path)
    nll_BT = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert store.save_array("nll/a.npy", nll_BT) == "nll/a.npy"
    np.testing.assert_array_equal(store.load_array("nll/a.npy"), nll_BT)
    assert slug("ppl__oracle:mask|0.5 x") == "ppl__oracle_mask_0.5_x"
    assert jsonable({1: (np.int64(2), float("nan"))}) == {"1": [2, None]}

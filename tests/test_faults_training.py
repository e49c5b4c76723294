"""Faults in gate training and in the files the tool writes (issue 13): checkpoints of other
training data, pruning, NaN and infinity, output paths checked before the work, atomic
writes, a sweep's results directory of other settings, a run killed with SIGKILL."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import time
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest

from eval.result_store import RESULTS_FILE, ConfigMismatchError, ResultStore
from eval.sweep import run_sweep
from eval.sweep_settings import PerplexitySettings, SweepSettings
from smartkv_cli.main import main as smartkv_main
from smartkv_jax import gate_checkpoint as gc
from smartkv_jax import jsonio
from smartkv_jax.errors import SmartKVError
from smartkv_jax.gates import GateConfig
from train.batches import ShardStream, shard_rows
from train.label_store import open_store
from train.metrics import NonFiniteError, summarize_r2
from train.train_gates import TrainConfig, train_gates

from . import test_train_gates as ttg
from .label_stores import D, K, L, make_store
from .test_eval_needle import CharTokenizer, tiny_params
from .test_eval_report import write_books
from .test_gate_checkpoint import _gates, _save

stores, baseline = ttg.stores, ttg.baseline  # the shared module fixtures

GATE = GateConfig(L, K, D, hidden=8)
TINY = TrainConfig(steps=6, batch_size=64, lr=1e-2, warmup=2, eval_every=0, ckpt_every=2)


def _train(store, ckpt, cfg=TINY, **kw):
    return train_gates(store, None, cfg, ckpt, gate=GATE, progress=False, **kw)


def _steps(ckpt: Path) -> list[int]:
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())


# ----------------------------------------------------------------- training data identity


def test_resume_with_other_label_store_is_refused_and_keeps_checkpoints(stores, tmp_path):
    ckpt = tmp_path / "ckpt"
    _train(stores["train"], ckpt)
    before = ttg._step_dirs(ckpt)
    other = make_store(tmp_path / "other", n_windows=4, seed=7)
    with pytest.raises(gc.CheckpointMismatchError, match="training label stores differ") as err:
        _train(other, ckpt, TrainConfig(**{**TINY.to_dict(), "steps": 12}))
    text = str(err.value)
    for part in ("checkpoint step 6", f"{stores['train']}", f"{other}", "rows: 1024 != 512"):
        assert part in text, text
    assert "metadata_sha256" in text and "left untouched" in text
    copy = shutil.copytree(stores["train"], tmp_path / "moved_train")  # same data, new path
    with pytest.raises(gc.CheckpointMismatchError, match=r"train: \["):
        _train(copy, ckpt)
    assert ttg._step_dirs(ckpt) == before
    _, meta = gc.load_gates(ckpt)
    assert meta["step"] == 6 and meta["data"]["train"] == [str(stores["train"].absolute())]
    assert meta["data"]["taus"] == [0.05, 0.11] and meta["data"]["cap"] == 64


def test_checkpoint_without_data_identity_is_checked_by_its_store_path():
    expected = {"model": "m", "tau": 0.05, "store_shape": [L, K, D], "gate_config": {}}
    expected["data"] = {"train": ["/new/store"], "rows": 4}
    old = {**expected, "label_store": {"train": "/old/store"}}
    del old["data"]
    assert gc.setup_problems(old, expected) == [
        "training label stores differ (train: ['/old/store'] != ['/new/store'])"
    ]
    assert gc.setup_problems({**old, "label_store": {"train": "/new/store"}}, expected) == []


def test_pruning_never_deletes_another_runs_checkpoints(stores, tmp_path):
    mixed, other_dir = tmp_path / "mixed", tmp_path / "other_run"
    other = make_store(tmp_path / "other", n_windows=4, seed=7)
    _train(other, mixed, TrainConfig(**{**TINY.to_dict(), "steps": 4}))
    _train(stores["train"], other_dir, TrainConfig(**{**TINY.to_dict(), "steps": 10}), stop_after=6)
    shutil.copytree(other_dir / "6", mixed / "6")  # the latest step is this run's
    assert _steps(mixed) == [2, 4, 6]
    cfg = TrainConfig(**{**TINY.to_dict(), "steps": 10, "keep_checkpoints": 1})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # keep_checkpoints changed: a warning
        _, hist = _train(stores["train"], mixed, cfg)
    assert hist["resumed_from"] == 6
    assert _steps(mixed) == [2, 4, 10]  # this run's 6 and 8 pruned, the other run's kept
    _, meta = gc.load_gates(mixed, step=4)
    assert meta["data"]["train"] == [str(other.absolute())]


# ----------------------------------------------------------------------- NaN and infinity


def _row_first_used_at(store, cfg: TrainConfig, step: int) -> int:
    """A trainable row that the batches first read at (1-based) `step` and that is not one of
    the normalisation statistics' rows (the first row of each shard with stats_rows=8)."""
    rows = np.flatnonzero(~store.censored_N & (store.pos_N >= cfg.exclude_sinks))
    shards = shard_rows(rows, cfg.data_shards)
    n = cfg.batch_size // cfg.data_shards
    stream = ShardStream(shards[0], cfg.seed, 0)
    seen = set(stream.take(0, (step - 1) * n).tolist()) | {int(shards[0][0])}
    return next(int(r) for r in stream.take((step - 1) * n, n) if r not in seen)


def test_nan_key_stops_training_at_its_step_and_keeps_last_good_checkpoint(tmp_path):
    store = open_store(make_store(tmp_path / "nan", n_windows=8, seed=3), in_memory=True)
    cfg = TrainConfig(**{**TINY.to_dict(), "steps": 12, "keep_checkpoints": 0, "stats_rows": 8})
    store.keys_NLKD[_row_first_used_at(store, cfg, 5), 1, 2, 3] = np.nan
    ckpt = tmp_path / "ckpt"
    with pytest.raises(NonFiniteError, match="training stopped at step 5: its loss is nan") as err:
        _train(store, ckpt, cfg)
    assert f"The last good checkpoint, step 4 in {ckpt}, is kept" in str(err.value)
    assert _steps(ckpt) == [2, 4]
    gates, meta = gc.load_gates(ckpt)
    assert meta["step"] == 4
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(gates.to_state()))


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_nan_key_in_the_statistics_rows_is_refused_before_training(tmp_path):
    store = open_store(make_store(tmp_path / "nan", n_windows=2, seed=3), in_memory=True)
    store.keys_NLKD[0, 0, 0, 0] = np.inf
    with pytest.raises(NonFiniteError, match="normalisation statistics .* are not finite"):
        _train(store, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists() or _steps(tmp_path / "ckpt") == []


def test_nan_checkpoint_is_refused_by_load_gates_naming_it(tmp_path):
    gates = _gates()
    gates.b_out[...] = np.full(gates.b_out.shape, np.nan, np.float32)
    _save(tmp_path / "ckpt", gates, step=7)
    with pytest.raises(gc.CheckpointNonFiniteError, match="NaN or infinite") as err:
        gc.load_gates(tmp_path / "ckpt")
    assert f"checkpoint step 7 in {tmp_path / 'ckpt'}" in str(err.value)
    assert "['b_out']" in str(err.value)
    meta = json.loads((tmp_path / "ckpt" / "7" / "metadata" / "metadata").read_text())
    assert meta["checksum"] == [None, None]  # stored as null, not a bare NaN
    with pytest.raises(FileNotFoundError, match=r"no checkpoint step 3 .* \(it has steps \[7\]\)"):
        gc.load_gates(tmp_path / "ckpt", step=3)


def test_json_output_never_holds_a_bare_nan(tmp_path):
    obj = {"a": math.nan, "b": np.float32(np.inf), "c": [np.float64(-np.inf), 1.5], "d": (1,)}
    obj["e"] = np.array([np.nan, 2.0])
    text = jsonio.dumps(obj, sort_keys=True)
    assert text == '{"a": null, "b": null, "c": [null, 1.5], "d": [1], "e": [null, 2.0]}'
    summary = summarize_r2(np.full((L, K), np.nan))
    strict = json.loads(jsonio.dumps(summary), parse_constant=pytest.fail)
    assert strict["median_r2"] is None and strict["r2_LK"][0] == [None] * K
    jsonio.write_json(tmp_path / "x.json", {"loss": math.nan})
    assert (tmp_path / "x.json").read_text() == '{"loss": null}\n'


# ------------------------------------------------------------ output files and atomic writes


def test_train_gates_out_is_checked_before_training(stores, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    base = ["train-gates", f"--train={stores['train']}", f"--ckpt-dir={ckpt}", "--steps=2"]
    cases = {
        tmp_path / "no_dir" / "s.json": "does not exist; create it first",
        tmp_path: "is a directory; give the path of a file to write",
    }
    for out, message in cases.items():
        assert smartkv_main([*base, f"--out={out}"]) == 2
        err = capsys.readouterr().err
        assert "smartkv train-gates: error: --out" in err and message in err, err
    assert not ckpt.exists()  # nothing was trained


def test_check_output_file(tmp_path):
    assert jsonio.check_output_file(tmp_path / "a.json") == tmp_path / "a.json"
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(SmartKVError, match="exists and is not a regular file"):
        jsonio.check_output_file(tmp_path / "fifo", "--report")
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "ro").mkdir(mode=0o555)
        with pytest.raises(SmartKVError, match="cannot write in directory"):
            jsonio.check_output_file(tmp_path / "ro" / "a.json")


def _fail_fsync(monkeypatch):
    def boom(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(jsonio.os, "fsync", boom)


def test_interrupted_results_write_leaves_the_old_file(tmp_path, monkeypatch):
    store = ResultStore(tmp_path)
    store.append({"key": "a", "ppl": 1.0})
    before = store.results_path.read_bytes()
    _fail_fsync(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        store.append({"key": "b", "ppl": 2.0})
    with pytest.raises(OSError):
        store.check_config("ppl", {"tokens": 3})
    monkeypatch.undo()
    assert store.results_path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [RESULTS_FILE]  # no temporary files
    (tmp_path / f".{RESULTS_FILE}.x1.tmp").write_text('{"key": "c"')  # a killed writer's
    store.append({"key": "d", "ppl": math.nan})
    assert [r["key"] for r in store.rows()] == ["a", "d"] and store.done()["d"]["ppl"] is None


# --------------------------------------------------------- results of another configuration


def test_results_of_another_configuration_are_refused_or_moved_aside(tmp_path):
    store = ResultStore(tmp_path)
    store.check_config("model", {"name": "m", "config": {"num_layers": 2, "dim": 8}})
    store.check_config("ppl", {"tokens": 64})
    store.append({"key": "ppl|full|1", "ppl": 3.0})
    store.save_array("nll/a.npy", np.zeros(3, np.float32))
    new_model = {"name": "m", "config": {"num_layers": 3, "dim": 8}}
    again = ResultStore(tmp_path)
    with pytest.raises(ConfigMismatchError, match=r"config\.num_layers: 2 -> 3\); use a new"):
        again.check_config("model", new_model)
    assert len(again.rows()) == 1
    fresh = ResultStore(tmp_path, overwrite=True)
    fresh.check_config("oracle_tau", 0.05)  # not recorded before: added, nothing moved
    with pytest.warns(UserWarning, match=r"moved its 3 files \(1 results\) to .*replaced-"):
        fresh.check_config("model", new_model)
    (old,) = tmp_path.glob("replaced-*")
    assert sorted(p.name for p in old.iterdir()) == ["config.json", "nll", RESULTS_FILE]
    assert fresh.rows() == [] and len(ResultStore(old).rows()) == 1
    assert fresh.config() == {"model": new_model, "oracle_tau": 0.05}


def test_sweep_with_overwrite_reruns_the_moved_entries(tmp_path):
    """A task's settings differ (found when its books load): the old results move aside and
    the sweep runs its entries again."""
    write_books(tmp_path / "books")
    ppl = PerplexitySettings(text=str(tmp_path / "books"), books=1, tokens=48, chunk=16)
    settings = SweepSettings(policies=("full",), memory=(0.5,), tasks=("ppl",), ppl=ppl)
    other = dataclasses.replace(settings, ppl=dataclasses.replace(ppl, pg19_dataset="x/y"))
    model, out = tiny_params(), tmp_path / "out"

    def sweep(s, **kw):
        seen = []
        rows = run_sweep(out, model, CharTokenizer(), s, model_name="tiny", progress=False,
                         on_result=lambda r: seen.append(r["key"]), **kw)  # fmt: skip
        return rows, seen

    rows, _ = sweep(settings)
    with pytest.raises(ConfigMismatchError, match=r"ppl configuration \(pg19_dataset: "):
        sweep(other)
    with pytest.warns(UserWarning, match="moved its"):
        rows_b, seen = sweep(other, overwrite=True)
    assert seen == [r["key"] for r in rows] and len(rows_b) == len(rows) == 1
    cfg = ResultStore(out).config()
    assert cfg["ppl"]["pg19_dataset"] == "x/y" and cfg["model"]["name"] == "tiny"


# ------------------------------------------------------------------- killed and rerun


def test_sigkilled_train_gates_resumes_on_rerun(stores, baseline, tmp_path):
    ckpt, out = tmp_path / "ckpt", tmp_path / "summary.json"
    extra = ["--ckpt-every=1", "--keep=0"]
    proc = ttg._cli(stores, ckpt, out, extra)
    deadline = time.monotonic() + 150
    while not (ckpt.is_dir() and len(_steps(ckpt)) >= 3):
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoints appeared"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    killed_at = _steps(ckpt)[-1]
    assert killed_at < ttg.SMALL.steps
    ttg._wait(ttg._cli(stores, ckpt, out, extra))
    report = json.loads(out.read_text(), parse_constant=pytest.fail)
    assert report["resumed_from"] >= killed_at
    params, meta = gc.load_gates(ckpt)
    assert meta["step"] == ttg.SMALL.steps
    ttg._assert_params_close(params, baseline[0], atol=1e-5)
    assert [p.name for p in ckpt.iterdir() if not p.name.isdigit()] == []  # no partial saves

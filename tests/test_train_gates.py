"""Gate training (train/train_gates.py, train/train_state.py, smartkv_cli/train_gates.py):
planted-function recovery, sharded and multi-process runs against one device, kill-and-resume,
damaged and mismatched checkpoints, the CLI."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from smartkv_cli.train_gates import GATE_HELP, TRAIN_HELP, add_cli
from smartkv_jax.gate_checkpoint import CheckpointCorruptError, CheckpointMismatchError, load_gates
from smartkv_jax.gates import GateConfig
from train.metrics import r2_per_head
from train.train_gates import TrainConfig, train_gates

from .label_stores import D, K, L, make_store

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    return {
        "train": make_store(root / "train", n_windows=8, seed=0),
        "test": make_store(root / "test", n_windows=4, seed=1),
        "root": root,
    }


GATE = GateConfig(L, K, D, hidden=16)
# shared by the one-device baseline and the 8-device / 2-process runs
SMALL = TrainConfig(steps=40, batch_size=64, lr=1e-2, warmup=5, eval_every=20, ckpt_every=20)
SMALL_FLAGS = [
    "--steps=40",
    "--batch-size=64",
    "--lr=0.01",
    "--warmup=5",
    "--eval-every=20",
    "--ckpt-every=20",
    "--hidden=16",
]


@pytest.fixture(scope="module")
def baseline(stores):
    """The SMALL run on this process's single device, checkpointed."""
    ckpt = stores["root"] / "ckpt_baseline"
    params, hist = train_gates(
        stores["train"], stores["test"], SMALL, ckpt, gate=GATE, progress=False
    )
    return params, hist, ckpt


def _cli(stores, ckpt: Path, out: Path, extra=(), devices: int = 1, **popen):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [
        sys.executable,
        "-m",
        "smartkv_cli.main",
        "train-gates",
        f"--train={stores['train']}",
        f"--eval={stores['test']}",
        f"--ckpt-dir={ckpt}",
        f"--out={out}",
        "--no-progress",
        *SMALL_FLAGS,
        *extra,
    ]
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _wait(proc, timeout=150) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"subprocess timed out:\n{out[-3000:]}") from None
    assert proc.returncode == 0, out[-3000:]
    return out


def _assert_params_close(a, b, atol):
    for x, y in zip(jax.tree.leaves(a.to_state()), jax.tree.leaves(b.to_state())):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=atol)


def test_recovers_planted_function(stores):
    cfg = TrainConfig(steps=200, batch_size=256, lr=1e-2, warmup=20, eval_every=100)
    params, hist = train_gates(stores["train"], stores["test"], cfg, None, progress=False)
    summary = hist["summary"]
    assert summary["median_r2"] > 0.9, summary
    assert min(min(row) for row in summary["r2_LK"]) > 0.8
    assert [e["step"] for e in hist["eval"]] == [100, 200]
    r2 = r2_per_head(params, stores["test"], 0.05)
    assert r2.shape == (L, K)
    np.testing.assert_allclose(r2, summary["r2_LK"], atol=1e-3)
    r2_nosink = r2_per_head(params, stores["test"], 0.05, exclude_first=4)
    np.testing.assert_allclose(r2_nosink, summary["nosink"]["r2_LK"], atol=1e-3)


def test_censored_loss_trains_on_a_store(stores):
    """The censored loss (train/metrics.py) trains with the censored rows included."""
    cfg = TrainConfig(loss="censored", steps=100, batch_size=256, lr=1e-2, warmup=10)
    _, hist = train_gates(stores["train"], stores["test"], cfg, None, progress=False)
    assert hist["summary"]["median_r2"] > 0.6


def test_kill_and_resume_matches_uninterrupted(stores, baseline, tmp_path):
    full, full_hist, _ = baseline
    ckpt = tmp_path / "ckpt"
    _, part = train_gates(
        stores["train"], stores["test"], SMALL, ckpt, gate=GATE, stop_after=25, progress=False
    )
    assert part["summary"] is None and sorted(int(p.name) for p in ckpt.iterdir()) == [20, 25]
    resumed, hist = train_gates(stores["train"], stores["test"], SMALL, ckpt, gate=GATE)
    assert hist["resumed_from"] == 25
    _assert_params_close(resumed, full, atol=0)
    assert hist["eval"] == full_hist["eval"]
    assert hist["summary"]["median_r2"] == full_hist["summary"]["median_r2"]
    loaded, meta = load_gates(ckpt)
    _assert_params_close(loaded, full, atol=0)
    assert meta["step"] == 40 and meta["tau"] == 0.05 and meta["model"] == "synthetic"
    assert meta["gate_config"] == GATE.to_dict()
    assert meta["train_config"]["lr"] == SMALL.lr
    assert meta["label_store"]["train"].endswith("train")


def _step_dirs(ckpt: Path) -> dict[str, int]:
    return {p.name: sum(1 for _ in p.rglob("*")) for p in ckpt.iterdir()}


def test_mismatched_checkpoint_is_refused_and_kept(stores, baseline, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(baseline[2], ckpt)
    before = _step_dirs(ckpt)
    with pytest.raises(CheckpointMismatchError, match=r"tau 0.05 != 0.11"):
        train_gates(stores["train"], None, dataclasses.replace(SMALL, tau=0.11), ckpt, gate=GATE)
    with pytest.raises(CheckpointMismatchError, match=r"hidden: 16 != 32"):
        train_gates(stores["train"], None, SMALL, ckpt, gate=dataclasses.replace(GATE, hidden=32))
    other = make_store(tmp_path / "other_model", n_windows=8, seed=0, model="other-llm")
    with pytest.raises(CheckpointMismatchError, match="model 'synthetic' != 'other-llm'"):
        train_gates(other, None, SMALL, ckpt, gate=GATE)
    assert _step_dirs(ckpt) == before


@pytest.mark.parametrize("damage", ["weights", "bitflip", "metadata"])
def test_corrupt_checkpoint_gives_clear_error_and_keeps_older(stores, baseline, tmp_path, damage):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(baseline[2], ckpt)
    before = _step_dirs(ckpt)
    latest = ckpt / "40"
    if damage == "metadata":
        (latest / "metadata" / "metadata").write_text("{not json")
    else:
        files = [f for f in (latest / "state").rglob("*") if f.is_file()]
        if damage == "bitflip":  # only array chunks: the file structure still parses
            files = [f for f in files if f.parent.name == "d"]
        else:
            files = [f for f in files if "commit" not in f.name]
        for f in files:
            b = bytearray(f.read_bytes())
            for i in range(len(b) // 2, len(b), 3):
                b[i] ^= 0x24
            f.write_bytes(bytes(b))
    with pytest.raises(CheckpointCorruptError, match="checkpoint step 40") as err:
        train_gates(stores["train"], None, SMALL, ckpt, gate=GATE, progress=False)
    assert "Nothing was deleted" in str(err.value)
    with pytest.raises(CheckpointCorruptError):
        load_gates(ckpt)
    assert _step_dirs(ckpt) == before
    older, meta = load_gates(ckpt, step=20)  # the older checkpoint still loads
    assert meta["step"] == 20


def test_eight_devices_match_one_device(stores, baseline, tmp_path):
    """data=2 x model=4 mesh: the 6 heads are padded to 8 and split over "model"."""
    out = tmp_path / "summary.json"
    proc = _cli(stores, tmp_path / "ckpt", out, ["--mesh-data=2", "--mesh-model=4"], devices=8)
    _wait(proc)
    report = json.loads(out.read_text())
    assert report["mesh"] == {"data": 2, "model": 4}
    params, meta = load_gates(tmp_path / "ckpt")
    _assert_params_close(params, baseline[0], atol=1e-5)
    np.testing.assert_allclose(
        report["summary"]["median_r2"], baseline[1]["summary"]["median_r2"], atol=1e-4
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(stores, baseline, tmp_path):
    """Two processes (2 CPU devices each, gloo collectives), each feeding its own data
    shards; the mesh is data=2 x model=2 across them."""
    port = _free_port()
    outs = [tmp_path / f"summary{i}.json" for i in range(2)]
    procs = [
        _cli(
            stores,
            tmp_path / "ckpt",
            outs[i],
            [f"--coordinator=127.0.0.1:{port}", "--num-processes=2", f"--process-id={i}"],
            devices=2,
        )
        for i in range(2)
    ]
    logs = [_wait(p) for p in procs]
    report = json.loads(outs[0].read_text())
    assert report["processes"] == 2 and report["mesh"] == {"data": 2, "model": 2}, logs[0]
    params, _ = load_gates(tmp_path / "ckpt")
    _assert_params_close(params, baseline[0], atol=1e-5)
    np.testing.assert_allclose(
        report["summary"]["median_r2"], baseline[1]["summary"]["median_r2"], atol=1e-4
    )


def test_cli_flags_all_have_help():
    parser = argparse.ArgumentParser(prog="smartkv")
    sub = parser.add_subparsers(dest="command")
    p = add_cli(sub)
    for action in p._actions:
        assert action.help, action.option_strings
    text = p.format_help()
    for flag in ("--train", "--eval", "--tau", "--steps", "--batch-size", "--lr", "--hidden"):
        assert flag in text
    for flag in ("--ckpt-dir", "--loss", "--json"):
        assert flag in text
    args = parser.parse_args(["train-gates", "--train", "x", "--loss", "censored"])
    assert args.loss == "censored" and callable(args.func)
    # flags carry the configs' defaults, and turn into the configs
    args = parser.parse_args(["train-gates", "--train", "x", "--keep", "5", "--no-key-norm"])
    cfg = TrainConfig(**{name: getattr(args, name) for name in TRAIN_HELP})
    assert cfg == dataclasses.replace(TrainConfig(), keep_checkpoints=5)
    gate = GateConfig(L, K, D, **{name: getattr(args, name) for name in GATE_HELP})
    assert gate == GateConfig(L, K, D, key_norm=False)

"""Gate training (train/train_gates.py): planted-function recovery, sharded and multi-process
runs against one device, kill-and-resume, damaged and mismatched checkpoints, the CLI."""

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
import jax.numpy as jnp
import numpy as np
import pytest

from smartkv_jax.gates import GateConfig
from train.train_gates import (
    CheckpointCorruptError,
    CheckpointMismatchError,
    TrainConfig,
    _loss_fn,
    add_cli,
    load_gates,
    open_store,
    r2_per_head,
    train_gates,
)

REPO = Path(__file__).resolve().parents[1]
L, K, D = 2, 3, 8
T, CAP = 128, 64
TAUS = (0.05, 0.11)


def make_store(path: Path, *, n_windows: int, seed: int, model: str = "synthetic") -> Path:
    """A label store with the schema of train/labels.py whose lifespans are a planted smooth
    function of the key (different per head and tau), rounded and clipped at the cap."""
    import datasets

    rng = np.random.default_rng(seed)
    plant = np.random.default_rng(1234)  # the same planted function for every store
    w_TLKD = plant.normal(size=(len(TAUS), L, K, D)) / np.sqrt(D)
    mu_LKD = plant.normal(size=(L, K, D)) * 3
    scale_LKD = np.exp(plant.normal(size=(L, K, D)))
    n = n_windows * T
    keys = (rng.normal(size=(n, L, K, D)) * scale_LKD + mu_LKD).astype(np.float32)
    z = np.einsum("nlkd,tlkd->ntlk", (keys - mu_LKD) / scale_LKD, w_TLKD)
    life = np.clip(np.round(4.0 ** (1.8 + 1.4 * np.tanh(z)) - 1), 0, CAP).astype(np.int32)
    pos = np.tile(np.arange(T, dtype=np.int32), n_windows)
    features = datasets.Features(
        {
            "key": datasets.Array3D((L, K, D), "float32"),
            "lifespan": datasets.Array3D((len(TAUS), L, K), "int32"),
            "censored": datasets.Value("bool"),
            "pos": datasets.Value("int32"),
            "doc": datasets.Value("string"),
            "window": datasets.Value("int32"),
        }
    )
    ds = datasets.Dataset.from_dict(
        {
            "key": keys,
            "lifespan": life,
            "censored": pos > T - 1 - CAP,
            "pos": pos,
            "doc": ["book.txt"] * n,
            "window": np.repeat(np.arange(n_windows, dtype=np.int32), T),
        },
        features=features,
    )
    path.mkdir(parents=True)
    ds.save_to_disk(str(path / "data"))
    meta = {
        "model": model,
        "taus": list(TAUS),
        "window": T,
        "cap": CAP,
        "sources": ["book.txt"],
        "num_layers": L,
        "num_kv_heads": K,
        "head_dim": D,
        "n_windows": n_windows,
    }
    (path / "metadata.json").write_text(json.dumps(meta))
    return path


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
        "train.train_gates",
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


def test_store_opens_with_the_labels_schema(stores):
    s = open_store(stores["train"])
    assert s.shape == (L, K, D) and s.num_rows == 8 * T
    assert s.keys_NLKD.shape == (8 * T, L, K, D) and s.keys_NLKD.dtype == np.float32
    assert s.lifespan_NTLK.shape == (8 * T, 2, L, K)
    np.testing.assert_allclose(s.labels(0.11)[5], np.log1p(s.lifespan_NTLK[5, 1]) / np.log(4))
    assert s.censored_N.sum() == 8 * (CAP - 1) + 8 and s.pos_N[T + 3] == 3
    with pytest.raises(ValueError, match=r"tau 0.2 is not in label store"):
        s.tau_index(0.2)
    with pytest.raises(FileNotFoundError, match="not a label store"):
        open_store(stores["root"])
    other = make_store(stores["root"] / "other_model", n_windows=1, seed=2, model="other")
    with pytest.raises(ValueError, match="cannot join label stores .*: model differs"):
        open_store([stores["train"], other])


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


def test_censored_loss_only_penalises_predictions_below_the_bound(stores):
    from smartkv_jax.gates import flatten_heads, init_gates

    gate = GateConfig(1, 1, 4, hidden=0)
    params = flatten_heads(init_gates(gate, jax.random.key(0)))  # predicts 0 everywhere
    batch = {
        "keys": jnp.ones((3, 1, 4)),
        "pos": jnp.array([10, 11, 12]),
        "y": jnp.array([[1.0], [-1.0], [2.0]]),  # prediction 0 is below, above, below
        "lb": jnp.array([[True], [True], [False]]),
        "w": jnp.ones(3),
    }
    cfg = TrainConfig(loss="censored")
    got = float(_loss_fn(cfg, jnp.ones(1), params, batch))
    np.testing.assert_allclose(got, (1.0 + 0.0 + 4.0) / 3, rtol=1e-6)
    mse = float(_loss_fn(dataclasses.replace(cfg, loss="mse"), jnp.ones(1), params, batch))
    np.testing.assert_allclose(mse, (1.0 + 1.0 + 4.0) / 3, rtol=1e-6)
    # and it trains (censored rows included) on a store
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

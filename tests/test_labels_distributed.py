"""`smartkv labels` over two processes (train/label_processes.py): each labels its share of
the windows and process 0 joins them into the store one process writes; an error on one
process stops all of them and replaces nothing; processes of different setups are refused;
the multi-process flags are checked."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from smartkv_jax.errors import SmartKVError
from train.label_store import open_store, partial_dir

from .faults import WORDS, assert_same_store, snapshot

REPO = Path(__file__).resolve().parents[1]
WINDOW = 64


@pytest.fixture(scope="module")
def books(tmp_path_factory) -> Path:
    """Book a holds 2 windows of WINDOW words, b one: 3 windows, split 2 + 1 over 2 processes."""
    path = tmp_path_factory.mktemp("books")
    rng = np.random.default_rng(0)
    for name, windows in (("a", 2), ("b", 1)):
        (path / f"{name}.txt").write_text(" ".join(rng.choice(WORDS, WINDOW * windows + 10)))
    return path


def labels_argv(model: Path, books: Path, out: Path, *extra: str) -> list[str]:
    return [
        "labels", "--model", str(model), "--text", str(books), "--window", str(WINDOW),
        "--cap", "16", "--chunk", "32", "--windows-per-doc", "2", "--out", str(out), *extra,
    ]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(argvs: list[list[str]]) -> list[subprocess.Popen]:
    """One `smartkv` process per argv, joined by jax.distributed on a free localhost port."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    flags = [f"--coordinator=127.0.0.1:{_free_port()}", f"--num-processes={len(argvs)}"]
    return [
        subprocess.Popen(
            [sys.executable, "-m", "smartkv_cli.main", *argv, *flags, f"--process-id={i}"],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, argv in enumerate(argvs)
    ]


def _finish(procs: list[subprocess.Popen], timeout: float = 120) -> list[tuple[int, str, str]]:
    """(exit status, stdout, stderr) of each process."""
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        raise AssertionError([p.communicate()[1][-2000:] for p in procs]) from None
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs)]


def test_two_processes_write_the_store_one_process_writes(tmp_path, hf_model_dir, books):
    from smartkv_cli.main import main

    ref, out = tmp_path / "ref", tmp_path / "out"
    procs = _launch([labels_argv(hf_model_dir, books, out)] * 2)
    assert main(labels_argv(hf_model_dir, books, ref)) == 0  # meanwhile, in this process
    (status0, out0, err0), (status1, out1, err1) = _finish(procs)
    assert status0 == 0 and status1 == 0, (err0[-2000:], err1[-2000:])
    # only process 0 reports (gloo adds a line of its own)
    assert re.fullmatch(
        f"label store {out}: 3 windows of {WINDOW} tokens \\(\\d+ tokens/s\\)",
        out0.splitlines()[-1],
    ), out0
    assert "label store" not in out1, out1
    # windows 0 and 2 on process 0, window 1 on process 1, each labelled once
    assert re.search(r"labelling windows \(process 0 of 2\): 100%.*\| 2/2", err0), err0
    assert re.search(r"labelling windows \(process 1 of 2\): 100%.*\| 1/1", err1), err1
    assert_same_store(out, ref)
    assert open_store(out).meta["n_windows"] == 3 and not partial_dir(out).exists()


def test_a_refusal_on_process_0_stops_every_process(tmp_path, hf_model_dir, books):
    """A store of another setup at --out: process 0 refuses to replace it (no --overwrite),
    process 1 stops too, and the store is left as it was."""
    from smartkv_cli.main import main

    out = tmp_path / "out"
    assert main(labels_argv(hf_model_dir, books, out, "--cap", "8")) == 0
    before = snapshot(out)
    (status0, _, err0), (status1, _, err1) = _finish(
        _launch([labels_argv(hf_model_dir, books, out)] * 2)
    )
    assert status0 == 2 and status1 == 2, (err0[-2000:], err1[-2000:])
    assert (
        f"smartkv labels: error: label store {out} already exists and was labelled with another "
        "setup (cap: 8 -> 16"
    ) in err0, err0
    assert (
        f"smartkv labels: error: opening label store {out} failed on process [0] (its output "
        "says why)"
    ) in err1.splitlines(), err1
    assert snapshot(out) == before and not partial_dir(out).exists()


def test_processes_with_another_setup_are_refused(monkeypatch):
    """What every process raises when one of them (here process 1, in a faked gather of two
    processes) has another setup than process 0."""
    from train import distributed
    from train.label_processes import open_run

    def gather_with_other(row_SV):  # [1, V] here; process 1 sends another CRC
        other = row_SV.copy()
        other[0, 1] += 1
        return np.stack([row_SV, other])  # [P, 1, V]

    monkeypatch.setattr(distributed, "allgather_f64", gather_with_other)
    with pytest.raises(SmartKVError) as err:
        open_run("unused", {"cap": 16}, [("a.txt", 0)], None, overwrite=False)
    assert str(err.value) == (
        "process [1] would label with another setup than process 0 (flags, model, text or "
        "--out differ): start every process with the same ones"
    )


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--num-processes=2", "--process-id=2"], "--process-id must be < --num-processes (2)"),
        (["--num-processes", "0"], "--num-processes must be >= 1, got 0"),
        (["--process-id", "-1"], "--process-id must be >= 0, got -1"),
        (["--num-processes", "2"], "multi-process runs need --coordinator and --process-id"),
    ],
)
def test_bad_process_flags_are_one_line_errors(tmp_path, books, capsys, extra, message):
    from smartkv_cli.main import main

    assert main(labels_argv(tmp_path / "no-model", books, tmp_path / "out", *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("smartkv labels: error: ") and message in err, err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()

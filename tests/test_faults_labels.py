"""Label stores are written without ever destroying one: a store of another setup, or
anything that is not a store, is never replaced silently; `smartkv labels` killed mid-run
leaves the old store intact and resumes, on rerun, to the store an uninterrupted run writes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from smartkv_jax.errors import SmartKVError
from train.label_store import StoreWriter, finish_install, open_store, partial_dir

from .faults import (
    STORE_META,
    WORDS,
    assert_same_store,
    fails,
    snapshot,
    store_window,
)
from .label_stores import TAUS, D, K, L

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- store writes


def _writer(value: float) -> StoreWriter:
    writer = StoreWriter(L, K, D, len(TAUS))
    writer.add_window(store_window(np.full((4, L, K, D), value, np.float32)), "a.txt", 0)
    return writer


def test_store_writes_never_destroy(tmp_path):
    out, meta = tmp_path / "s", STORE_META
    _writer(1.0).write(out, meta)
    before = snapshot(out)
    fails(lambda: _writer(2.0).write(out, meta), SmartKVError, "already exists", names=out)
    assert snapshot(out) == before
    _writer(2.0).write(out, meta, overwrite=True)
    assert open_store(out).keys_NLKD.max() == 2.0 and not partial_dir(out).exists()
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(
            SmartKVError, match=r"not a label store \(it holds todo.txt\); it is never replaced"
        ):
            _writer(3.0).write(other, meta, overwrite)
    assert (other / "todo.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    fails(lambda: _writer(3.0).write(tmp_path / "file", meta), SmartKVError, "is a file")


def test_a_move_cut_between_its_renames_is_finished(tmp_path):
    """An interruption inside the move into place leaves the old store and the new one in
    <out>.partial/; the next write (or open for writing) completes the move."""
    out, meta = tmp_path / "s", STORE_META
    _writer(1.0).write(out, meta)
    work = partial_dir(out)
    work.mkdir()
    os.replace(out, work / "old")  # cut after the first rename: the new store is complete
    _writer(2.0).write(tmp_path / "new", meta)
    os.replace(tmp_path / "new", work / "assembled")
    finish_install(out)
    assert open_store(out).keys_NLKD.max() == 2.0 and not (work / "old").exists()
    os.replace(out, work / "old")  # cut while the new store was still being written
    (work / "assembled").mkdir()
    finish_install(out)  # the old store goes back
    assert open_store(out).keys_NLKD.max() == 2.0


# ----------------------------------------------------------------------------- smartkv labels

WINDOWS = 8  # windows per book; two books


@pytest.fixture(scope="module")
def books(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("books")
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (path / f"{name}.txt").write_text(" ".join(rng.choice(WORDS, 64 * WINDOWS + 10)))
    return path


def labels_argv(model: Path, books: Path, out: Path, *extra: str) -> list[str]:
    return [
        "labels", "--model", str(model), "--text", str(books), "--window", "64", "--cap", "16",
        "--chunk", "32", "--windows-per-doc", str(WINDOWS), "--out", str(out), *extra,
    ]  # fmt: skip


def _shards(out: Path) -> int:
    folder = partial_dir(out) / "windows"
    return sum(p.name.isdigit() for p in folder.iterdir()) if folder.is_dir() else 0


def _kill_after(argv: list[str], out: Path, shards: int, log: Path) -> int:
    """Run `smartkv` in a subprocess, SIGKILL it once `shards` windows are saved; its status."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "smartkv_cli.main", *argv]
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 600
        while _shards(out) < shards and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        return proc.wait()


def test_labels_killed_mid_run_resumes_to_the_same_store(tmp_path, hf_model_dir, books, capsys):
    from smartkv_cli.main import main

    ref, out = tmp_path / "ref", tmp_path / "out"
    assert main(labels_argv(hf_model_dir, books, ref)) == 0
    assert main(labels_argv(hf_model_dir, books, out, "--windows-per-doc", "1")) == 0
    old = snapshot(out)
    argv = labels_argv(hf_model_dir, books, out, "--overwrite")
    status = _kill_after(argv, out, 2, tmp_path / "log")
    assert status == -signal.SIGKILL, (tmp_path / "log").read_text()
    assert snapshot(out) == old  # the old store is intact while the new one is unfinished
    assert 2 <= _shards(out) < 2 * WINDOWS
    capsys.readouterr()
    assert main(argv) == 0
    assert re.search(f"resuming: \\d+ of {2 * WINDOWS} windows", capsys.readouterr().err)
    assert_same_store(out, ref)
    assert not partial_dir(out).exists()


def test_labels_without_an_old_store_killed_and_rerun(tmp_path, hf_model_dir, books, capsys):
    from smartkv_cli.main import main

    ref, out = tmp_path / "ref", tmp_path / "out"
    assert main(labels_argv(hf_model_dir, books, ref)) == 0
    argv = labels_argv(hf_model_dir, books, out)
    assert _kill_after(argv, out, 1, tmp_path / "log") == -signal.SIGKILL
    fails(lambda: open_store(out), FileNotFoundError, "unfinished `smartkv labels`: rerun it")
    assert main(argv) == 0
    assert_same_store(out, ref)


def test_labels_refuse_another_setup_and_keep_the_same_one(tmp_path, hf_model_dir, books, capsys):
    from smartkv_cli.main import main

    out = tmp_path / "out"
    assert main(labels_argv(hf_model_dir, books, out, "--windows-per-doc", "1")) == 0
    before = snapshot(out)
    capsys.readouterr()
    assert main(labels_argv(hf_model_dir, books, out, "--windows-per-doc", "2", "--cap", "8")) == 2
    err = capsys.readouterr().err
    assert (
        f"label store {out} already exists and was labelled with another setup (cap: 16 -> 8" in err
    )
    assert "windows_per_doc: 1 -> 2" in err and "pass --overwrite to replace it" in err
    assert snapshot(out) == before and not partial_dir(out).exists()
    assert main(labels_argv(hf_model_dir, books, out, "--windows-per-doc", "1")) == 0
    assert "already holds these 2 windows: kept" in capsys.readouterr().err
    assert snapshot(out) == before
    assert main(labels_argv(hf_model_dir, books, out, "--windows-per-doc", "2", "--overwrite")) == 0
    assert open_store(out).meta["windows_per_doc"] == 2


def test_labels_unfinished_windows_of_another_setup(tmp_path, hf_model_dir, books, capsys):
    from smartkv_cli.main import main

    out = tmp_path / "out"
    work = partial_dir(out)
    (work / "windows" / "00000").mkdir(parents=True)
    (work / "setup.json").write_text(json.dumps({"model": "other"}))
    argv = labels_argv(hf_model_dir, books, out, "--windows-per-doc", "1")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{work} holds unfinished windows of another setup (model: 'other' -> " in err
    assert (work / "windows" / "00000").is_dir() and not out.exists()
    assert main([*argv, "--overwrite"]) == 0
    assert open_store(out).num_rows == 2 * 64 and not work.exists()


def test_labels_never_replace_other_content(tmp_path, hf_model_dir, books, capsys):
    from smartkv_cli.main import main

    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(labels_argv(hf_model_dir, books, out, "--overwrite")) == 2
    assert "is not a label store (it holds notes.txt); it is never replaced" in (
        capsys.readouterr().err
    )
    assert snapshot(out) == {"notes.txt": b"keep me"}

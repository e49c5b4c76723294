"""A `smartkv labels` run split over the processes of jax.distributed (docs/design.md: sharding
and scale); one process is the case P = 1 of the same steps.

Every process computes the same setup (checked first). Process 0 alone opens the work
directory `<out>.partial/` (train/label_shards.py: the checks of a store or unfinished windows
already there); then process p labels windows p, p + P, p + 2P, ... of those not finished yet,
on its own device, each saved as its window's shard; once all are done, process 0 alone joins
the shards, in window order, into the store, exactly as one process writes it. The shards are
files, so every process must see `<out>.partial/` (one machine, or a shared file system).

Each step ends in `on_every_process`: an error on one process stops every process, and the
store is not joined; the finished shards stay and a rerun, with any number of processes,
resumes them.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from smartkv_jax.errors import SmartKVError
from smartkv_jax.jsonio import dumps

from .distributed import on_every_process
from .label_shards import PartialStore
from .label_store import read_metadata


def open_run(
    out: str | Path,
    setup: dict[str, Any],
    windows: Sequence[tuple[str, int]],
    features,
    overwrite: bool,
) -> tuple[PartialStore, list[int]]:
    """The run on this process and the indices of the windows it labels. `run.complete` is the
    metadata of a store of this setup already at `out` (then there is nothing to label)."""
    _check_same_setup(out, setup)
    first = jax.process_index() == 0
    opened: list[PartialStore] = []

    def opened_state() -> np.ndarray:  # [n_windows + 1]: window finished, then "complete"
        if not first:
            return np.zeros(len(windows) + 1)
        opened.append(PartialStore(out, setup, windows, features, overwrite=overwrite))
        done_W = np.isin(np.arange(len(windows)), list(opened[0].done))
        return np.append(done_W, opened[0].complete is not None)

    state_W = on_every_process(f"opening label store {out}", opened_state, len(windows) + 1)[0]
    run = opened[0] if first else PartialStore(out, setup, windows, features, joined=True)
    if state_W[-1] and not first:
        run.complete = read_metadata(run.out)
    todo = np.flatnonzero(state_W[:-1] == 0)
    return run, todo[jax.process_index() :: jax.process_count()].tolist()


def finish_run(run: PartialStore, meta: dict[str, Any]) -> dict[str, Any]:
    """Process 0 joins every process's shards into the store; the store's metadata (meta plus
    tokens_per_s, per second of labelling time summed over windows) on every process."""
    first = jax.process_index() == 0

    def join() -> None:
        if first:
            run.rescan()
            tokens = len(run.windows) * run.setup["window"]
            run.finish({**meta, "tokens_per_s": tokens / max(run.seconds, 1e-9)})

    on_every_process(f"joining the windows into {run.out}", join)
    return read_metadata(run.out)


def _check_same_setup(out: str | Path, setup: dict[str, Any]) -> None:
    """SmartKVError on every process unless all have the same setup and --out."""
    crc = zlib.crc32(dumps({"out": os.fspath(out), **setup}).encode())
    crcs_P = on_every_process("comparing the processes' setups", lambda: [crc], 1)[:, 0]
    differ = np.flatnonzero(crcs_P != crcs_P[0]).tolist()
    if differ:
        raise SmartKVError(
            f"process {differ} would label with another setup than process 0 (flags, model, "
            "text or --out differ): start every process with the same ones"
        )

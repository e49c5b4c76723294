"""Resumable label-store writing: the windows of a `smartkv labels` run, kept as one shard per
window next to the target so that a killed run resumes where it stopped and ends with the
same store as an uninterrupted one (train/label_store.py: the format and how a finished store
is moved into place).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from smartkv_jax.errors import InputFileError, SmartKVError
from smartkv_jax.input_files import read_json_file
from smartkv_jax.jsonio import describe_differences, write_json

from .label_store import (
    finish_install,
    holds_store,
    open_store,
    partial_dir,
    quiet_datasets,
    remove_path,
    window_rows,
    write_store,
)


class PartialStore:
    """The windows of a label store being written by `smartkv labels`, one shard per window
    in `<out>.partial/windows/NNNNN/` (data/ + window.json, each moved into place when
    complete), under `<out>.partial/setup.json`, the setup that made them. A rerun with the
    same setup resumes; `finish` assembles the shards in order and moves the store into place.

    On opening: a complete store of the same setup at `out` is kept (`complete` holds its
    metadata, nothing is labelled); a store of another setup, or a damaged one, is refused
    unless `overwrite` (then replaced at `finish`, not before); unfinished windows of another
    setup are refused unless `overwrite` (then discarded). With `joined`, none of this: a
    handle that adds shards to the work directory another process has opened.
    """

    def __init__(
        self,
        out: str | Path,
        setup: dict[str, Any],
        windows: Sequence[tuple[str, int]],
        features,
        overwrite: bool = False,
        joined: bool = False,
    ):
        self.out, self.work = Path(out), partial_dir(out)
        self.setup, self.windows, self.features = setup, list(windows), features
        self.done: dict[int, float] = {}  # window index -> seconds it took
        self.complete = None
        if joined:  # another process opened the work directory (train/label_processes.py)
            return
        finish_install(self.out)
        self.complete = self._complete_store(overwrite)
        if self.complete is not None:
            if self._other_setup() is None:
                remove_path(self.work)  # left by a run killed after its store was in place
            return
        self._open_work(overwrite)
        self.done = self._finished_windows()

    @property
    def seconds(self) -> float:
        """Labelling time of the finished windows, over every run."""
        return sum(self.done.values())

    def _complete_store(self, overwrite: bool) -> dict | None:
        if not holds_store(self.out):
            return None
        try:
            meta = open_store(self.out, in_memory=False).meta
            diff = setup_differences(meta, self.setup)
            if not diff:
                return meta
            problem = f"was labelled with another setup ({diff})"
        except (InputFileError, FileNotFoundError) as err:
            problem = f"is damaged ({err})"
        if not overwrite:
            raise SmartKVError(
                f"label store {self.out} already exists and {problem}; pass --overwrite to "
                "replace it (the old store stays until the new one is complete)"
            )
        return None

    def _other_setup(self) -> str | None:
        """None if the work directory is absent or of this setup, else what differs."""
        if not self.work.exists():
            return None
        try:
            old = read_json_file(self.work / "setup.json", "labelling setup")
        except (InputFileError, FileNotFoundError) as err:
            return f"of an unknown setup ({err})"
        diff = setup_differences(old, self.setup)
        return f"of another setup ({diff})" if diff else None

    def _open_work(self, overwrite: bool) -> None:
        # an assembly cut short (finish_install has already installed any complete one)
        remove_path(self.work / "assembled")
        shards = self.work / "windows"
        problem = self._other_setup() if shards.exists() else None
        if problem is not None:
            if not overwrite:
                raise SmartKVError(
                    f"{self.work} holds unfinished windows {problem}; pass --overwrite to "
                    "discard them, or rerun with the setup that made them"
                )
            remove_path(self.work)
        shards.mkdir(parents=True, exist_ok=True)
        write_json(self.work / "setup.json", self.setup, indent=2)

    def _shard(self, index: int) -> Path:
        return self.work / "windows" / f"{index:05d}"

    def _finished_windows(self) -> dict[int, float]:
        done = {}
        for shard in sorted((self.work / "windows").iterdir()):
            seconds = self._shard_seconds(shard)
            if seconds is None:
                remove_path(shard)  # cut short, or not one of this setup's windows: relabelled
            else:
                done[int(shard.name)] = seconds
        return done

    def _shard_seconds(self, shard: Path) -> float | None:
        """The labelling time of a complete shard of one of `windows`; None for anything else."""
        import datasets

        if not (shard.name.isdigit() and int(shard.name) < len(self.windows)):
            return None
        try:
            info = read_json_file(shard / "window.json", "window shard")
            with quiet_datasets():
                rows = len(datasets.load_from_disk(str(shard / "data")))
        except Exception:  # any damage means: label this window again
            return None
        doc, window = self.windows[int(shard.name)]
        ok = info.get("doc") == doc and info.get("window") == window
        return float(info["seconds"]) if ok and rows == self.setup.get("window", rows) else None

    def add(
        self, index: int, labels: dict[str, np.ndarray], doc: str, window: int, seconds: float
    ) -> None:
        """Save window `index` (`doc`, `window`) as its shard; in place only once complete."""
        tmp = self.work / "windows" / f".{index:05d}.tmp"
        remove_path(tmp)
        with quiet_datasets():
            window_rows(labels, doc, window, self.features).save_to_disk(str(tmp / "data"))
        write_json(tmp / "window.json", {"doc": doc, "window": window, "seconds": seconds})
        remove_path(self._shard(index))
        os.replace(tmp, self._shard(index))
        self.done[index] = seconds

    def rescan(self) -> None:
        """Read which windows are finished from the shards on disk (other processes add
        theirs too)."""
        self.done = self._finished_windows()

    def finish(self, meta: dict[str, Any]) -> dict[str, Any]:
        """Assemble every window's shard, in order, into the store at `out` (replacing the
        one there, which the constructor allowed); delete the work directory. Returns meta."""
        import datasets

        missing = [i for i in range(len(self.windows)) if i not in self.done]
        if missing:
            raise SmartKVError(
                f"windows {missing} of {self.out} have no shard in {self.work / 'windows'} "
                "(processes labelling together must all see that directory)"
            )
        with quiet_datasets():
            shards = [self._shard(i) / "data" for i in range(len(self.windows))]
            parts = [datasets.load_from_disk(str(shard)) for shard in shards]
        write_store(parts, self.out, meta, overwrite=True)
        remove_path(self.work)
        return meta


def setup_differences(old: Any, new: dict[str, Any], limit: int = 6) -> str:
    """ "key: old -> new" for the keys of `new` whose value `old` (a store's metadata or a
    setup) does not share, in `new`'s order (the model first); "" when there are none."""
    old = old if isinstance(old, dict) else {}
    parts = [
        describe_differences({key: old.get(key)}, {key: value}, limit=2)
        for key, value in new.items()
        if old.get(key) != value
    ]
    more = f", and {len(parts) - limit} more" if len(parts) > limit else ""
    return ", ".join(parts[:limit]) + more

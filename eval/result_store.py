"""The resumable results directory of a sweep.

    config.json     model, oracle tau, gates and each task's settings and data (the text
                    used, the books, the needle prompts); a rerun with other settings is
                    refused instead of mixing results (with `overwrite`, the old results are
                    moved aside into replaced-<time>/ first)
    results.jsonl   one line per finished (task, policy, memory fraction), added as soon as
                    it is done; a rerun skips every entry already there
    nll/            per-token NLLs [B, T-1] (float32 .npy) of each perplexity entry
    oracle/         cached true lifespans of the books (the oracle's scores)
    report.md, *.png

Every file is written atomically (a temporary file renamed over the old one), so a crash
leaves the old file, never a torn one. See docs/design.md (evaluation).
"""

from __future__ import annotations

import json
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from smartkv_jax.errors import SmartKVError
from smartkv_jax.jsonio import (
    atomic_file,
    describe_differences,
    dumps,
    jsonable,
    write_json,
    write_text_atomic,
)

__all__ = ["CONFIG_FILE", "RESULTS_FILE", "ConfigMismatchError", "ResultStore", "jsonable", "slug"]

RESULTS_FILE = "results.jsonl"
CONFIG_FILE = "config.json"
REPLACED_PREFIX = "replaced-"


class ConfigMismatchError(SmartKVError):
    """A results directory was written with other settings than the current run's."""


def slug(text: str) -> str:
    """`text` as a file name: runs of other characters than [A-Za-z0-9_.-] become "_"."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a results.jsonl file (none if it does not exist; unreadable lines, as a
    torn last line from a crash, are skipped)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _grows(old: Any, new: Any, keys: tuple[str, ...]) -> bool:
    """Whether dict `new` differs from dict `old` only by larger numbers under `keys`."""
    if not (keys and isinstance(old, dict) and isinstance(new, dict)) or old.keys() != new.keys():
        return False
    changed = [k for k in old if old[k] != new[k]]
    return bool(changed) and all(k in keys and new[k] > old[k] for k in changed)


class ResultStore:
    """The results directory: config.json, results.jsonl (rows only added) and nll/*.npy.

    overwrite: a configuration section that differs from the stored one moves every stored
    file into replaced-<time>/ (with a warning) instead of raising ConfigMismatchError.
    """

    def __init__(self, out_dir: str | os.PathLike, overwrite: bool = False):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.overwrite = overwrite
        self._checked: dict[str, Any] = {}  # sections this run has checked or recorded

    @property
    def results_path(self) -> Path:
        return self.dir / RESULTS_FILE

    def rows(self) -> list[dict[str, Any]]:
        """Every stored result (a torn line from a crash of an older version is ignored)."""
        return read_rows(self.results_path)

    def done(self) -> dict[str, dict[str, Any]]:
        return {r["key"]: r for r in self.rows()}

    def append(self, row: dict[str, Any]) -> None:
        """Add one row: the file is rewritten atomically with the old text and the new line,
        so an interruption leaves the old file."""
        old = self.results_path.read_text() if self.results_path.is_file() else ""
        if old and not old.endswith("\n"):
            old += "\n"
        write_text_atomic(self.results_path, old + dumps(row, sort_keys=True) + "\n")

    def config(self) -> dict[str, Any]:
        path = self.dir / CONFIG_FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    def check_config(self, section: str, value: Any, growable: tuple[str, ...] = ()) -> None:
        """Record `value` under `section`, or raise ConfigMismatchError naming the keys that
        differ if another value is recorded there (an unset section can be filled later).
        growable: keys of a dict `value` that may exceed the recorded ones, the rest equal (a
        sweep given more samples extends the stored one); the record then takes `value`."""
        value = jsonable(value)
        old = self.config().get(section)
        if _grows(old, value, growable):
            self._save_config({**self.config(), section: value})
            old = value
        if old is not None and value is not None and old != value:
            diff = describe_differences(old, value)
            if not self.overwrite:
                raise ConfigMismatchError(
                    f"{self.dir} holds results for another {section} configuration ({diff}); "
                    "use a new --out directory, the same settings, or --overwrite (which "
                    "moves the old results aside)"
                )
            self._set_aside(f"another {section} configuration ({diff})")
            old = None
        if value is not None:
            self._checked[section] = value
        if old is None and value is not None:
            self._save_config({**self.config(), section: value})

    def _set_aside(self, why: str) -> None:
        """Move every stored file into a new replaced-<time>/ and keep only the sections
        this run has checked in config.json."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        dest = self.dir / f"{REPLACED_PREFIX}{stamp}"
        n = 1
        while dest.exists():
            n += 1
            dest = self.dir / f"{REPLACED_PREFIX}{stamp}-{n}"
        dest.mkdir()
        moved = [p for p in self.dir.iterdir() if not p.name.startswith(REPLACED_PREFIX)]
        for p in moved:
            p.rename(dest / p.name)
        if self._checked:
            self._save_config(self._checked)
        warnings.warn(
            f"--overwrite: {self.dir} held results for {why}; moved its {len(moved)} files "
            f"({len(read_rows(dest / RESULTS_FILE))} results) to {dest}",
            stacklevel=3,
        )

    def _save_config(self, cfg: dict[str, Any]) -> None:
        write_json(self.dir / CONFIG_FILE, cfg, indent=2, sort_keys=True)

    def save_array(self, name: str, arr: np.ndarray) -> str:
        """Write `arr` to `name` (relative, .npy) atomically; returns the relative name."""
        path = self.dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path, "wb") as f:
            np.save(f, arr)
        return name

    def load_array(self, name: str) -> np.ndarray:
        return np.load(self.dir / name)

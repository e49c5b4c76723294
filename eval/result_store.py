"""The resumable results directory of a sweep.

    config.json     model, oracle tau, gates and each task's settings and data (the text
                    used, the books, the needle prompts); a rerun with other settings is
                    refused instead of mixing results
    results.jsonl   one line per finished (task, policy, memory fraction), appended as soon
                    as it is done; a rerun skips every entry already there
    nll/            per-token NLLs [B, T-1] (float32 .npy) of each perplexity entry
    oracle/         cached true lifespans of the books (the oracle's scores)
    report.md, *.png

See docs/design.md (evaluation).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

RESULTS_FILE = "results.jsonl"
CONFIG_FILE = "config.json"


class ConfigMismatchError(ValueError):
    """A results directory was written with other settings than the current run's."""


def jsonable(x: Any) -> Any:
    """`x` with numpy scalars as Python numbers, tuples as lists and non-finite floats None."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def slug(text: str) -> str:
    """`text` as a file name: runs of other characters than [A-Za-z0-9_.-] become "_"."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


class ResultStore:
    """The results directory: config.json, results.jsonl (append-only) and nll/*.npy."""

    def __init__(self, out_dir: str | os.PathLike):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)

    @property
    def results_path(self) -> Path:
        return self.dir / RESULTS_FILE

    def rows(self) -> list[dict[str, Any]]:
        """Every stored result (a torn last line from a crash is ignored)."""
        if not self.results_path.is_file():
            return []
        out = []
        for line in self.results_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def done(self) -> dict[str, dict[str, Any]]:
        return {r["key"]: r for r in self.rows()}

    def append(self, row: dict[str, Any]) -> None:
        """Append one row and sync it to disk (after a torn last line, on a fresh line)."""
        torn = False
        if self.results_path.is_file() and self.results_path.stat().st_size:
            with open(self.results_path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
        with open(self.results_path, "a") as f:
            f.write(("\n" if torn else "") + json.dumps(jsonable(row), sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def config(self) -> dict[str, Any]:
        path = self.dir / CONFIG_FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    def check_config(self, section: str, value: Any) -> None:
        """Record `value` under `section`, or raise ConfigMismatchError if a different
        value is already recorded there (an unset section can be filled later)."""
        cfg = self.config()
        value = jsonable(value)
        old = cfg.get(section)
        if old is not None and value is not None and old != value:
            diff = _describe_diff(old, value)
            raise ConfigMismatchError(
                f"{self.dir} holds results for another {section} configuration ({diff}); "
                "use a new --out directory or the same settings"
            )
        if old is None and value is not None:
            cfg[section] = value
            self.save_json(CONFIG_FILE, cfg)

    def save_json(self, name: str, obj: Any) -> None:
        path = self.dir / name
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(jsonable(obj), indent=2, sort_keys=True))
        os.replace(tmp, path)

    def save_array(self, name: str, arr: np.ndarray) -> str:
        """Write `arr` to `name` (relative, .npy) atomically; returns the relative name."""
        path = self.dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.save(f, arr)
        os.replace(tmp, path)
        return name

    def load_array(self, name: str) -> np.ndarray:
        return np.load(self.dir / name)


def _describe_diff(old: Any, new: Any) -> str:
    """The keys whose values differ, "key: old -> new" (at most 400 characters)."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys)[:400]
    return f"{old!r} -> {new!r}"[:400]

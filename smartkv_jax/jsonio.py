"""JSON and file output shared by every command: no bare NaN, no half-written file.

- `jsonable` / `dumps`: numpy scalars and arrays as Python values, tuples as lists, and NaN
  or +-inf as null (`dumps` also refuses anything else that is not strict JSON).
- `atomic_file`, `write_text_atomic`, `write_json`: write to a temporary file beside the
  target, fsync, then rename over it, so an interrupted write leaves the old file (or
  none), never a torn one.
- `check_output_file`: an output file path checked before the work that fills it.
- `differences`: the dotted keys where two JSON-like values differ (for mismatch messages).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from .errors import SmartKVError


def jsonable(x: Any) -> Any:
    """`x` with numpy scalars and arrays as Python values, tuples as lists, dict keys as
    strings and non-finite floats as None."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def dumps(obj: Any, **kwargs: Any) -> str:
    """Strict JSON text of `jsonable(obj)` (json.dumps keyword arguments pass through)."""
    return json.dumps(jsonable(obj), allow_nan=False, **kwargs)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator[IO[Any]]:
    """A temporary file beside `path`, open in `mode`, that is flushed, fsynced and renamed
    over `path` when the block ends; on any failure the old file is left as it was and the
    temporary one removed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Replace `path` by `text` atomically (`atomic_file`)."""
    with atomic_file(path) as f:
        f.write(text)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any, **kwargs: Any) -> Path:
    """`write_text_atomic(path, dumps(obj, **kwargs) + newline)`."""
    return write_text_atomic(path, dumps(obj, **kwargs) + "\n")


def write_table_and_rows(out: str | os.PathLike, table: str, rows: Any) -> None:
    """A benchmark's outputs side by side: the markdown `table` in OUT.md and the `rows` in
    OUT.json (any suffix of `out` replaced; its directory made)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out.with_suffix(".md"), table + "\n")
    write_json(out.with_suffix(".json"), rows, indent=2)


def check_output_file(path: str | os.PathLike, flag: str = "--out") -> Path:
    """`path` if a file can be written there: not a directory nor another non-regular file,
    in an existing directory that accepts new files (tried with a temporary file). Raises
    SmartKVError naming `flag` otherwise. Call it before the work whose result goes there."""
    p = Path(path)
    if p.is_dir():
        raise SmartKVError(f"{flag} {p} is a directory; give the path of a file to write")
    if p.exists() and not p.is_file():
        raise SmartKVError(f"{flag} {p} exists and is not a regular file")
    parent = p.absolute().parent
    if not parent.is_dir():
        raise SmartKVError(f"{flag} {p}: directory {parent} does not exist; create it first")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as err:
        raise SmartKVError(
            f"{flag} {p}: cannot write in directory {parent} ({err.strerror or err})"
        ) from err
    return p


def differences(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) for every place where two JSON-like values differ,
    recursing into dicts present on both sides; ("", old, new) if they differ at the top."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            key = f"{prefix}.{k}" if prefix else str(k)
            if k in old and k in new:
                out += differences(old[k], new[k], key)
            elif old.get(k) != new.get(k):
                out.append((key, old.get(k), new.get(k)))
        return out
    return [] if old == new else [(prefix, old, new)]


def describe_differences(old: Any, new: Any, sep: str = "->", limit: int = 6) -> str:
    """The first `limit` differences as "key: old -> new" (long values shortened)."""
    diffs = differences(old, new)
    parts = [
        (f"{k}: " if k else "") + f"{_short(a)} {sep} {_short(b)}" for k, a, b in diffs[:limit]
    ]
    if len(diffs) > limit:
        parts.append(f"and {len(diffs) - limit} more")
    return ", ".join(parts)


def _short(x: Any, width: int = 80) -> str:
    text = repr(x)
    return text if len(text) <= width else text[: width - 3] + "..."

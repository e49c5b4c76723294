"""Reading the files a user gives (label-store metadata, policy tables, model configs): every
error names the file and what is wrong with it (missing, empty, not text, not JSON, cut off,
the wrong kind of JSON, a missing or unknown key).

A missing file raises FileNotFoundError; anything else wrong raises
`smartkv_jax.errors.InputFileError`.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .errors import InputFileError


def read_json_file(path: str | os.PathLike, what: str) -> Any:
    """The JSON value in file `path`; `what` names the kind of file in messages ("policy
    table", "label store metadata", ...)."""
    return parse_json_text(read_text_file(path, what), f"{what} {path}")


def read_text_file(path: str | os.PathLike, what: str, expected: str = "JSON") -> str:
    """The UTF-8 text of file `path` (FileNotFoundError if there is none, InputFileError for a
    directory, a file that cannot be read or bytes that are not UTF-8; `expected` names what
    the file should hold in that last message)."""
    path = Path(path)
    if path.is_dir():
        raise InputFileError(f"{what} {path} is a directory, not a file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputFileError(
            f"{what} {path} is not a text file (byte {err.start} is not UTF-8); expected {expected}"
        ) from None
    except OSError as err:  # permissions, a device error
        raise InputFileError(f"{what} {path} cannot be read: {err.strerror or err}") from None


def parse_json_text(text: str, where: str) -> Any:
    """The JSON value of `text`; `where` ("policy table t.json") starts every message."""
    if not text.strip():
        raise InputFileError(f"{where} is empty; expected JSON")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        end = text.rstrip()
        unclosed = end[:1] in "{[" and end[-1:] not in "}]"
        cut = "; the text ends early: truncated?" if unclosed or err.pos >= len(end) else ""
        raise InputFileError(
            f"{where} is not valid JSON: {err.msg} (line {err.lineno}, column {err.colno}{cut})"
        ) from None


def json_kind(value: Any) -> str:
    """ "an object", "a list", "a string", ... : the JSON kind of a parsed value."""
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    for t, name in kinds.items():
        if isinstance(value, t):
            return name
    return "a number" if isinstance(value, (int, float)) else type(value).__name__


def require_object(value: Any, where: str, keys: Iterable[str]) -> dict:
    """`value` if it is a JSON object, else InputFileError saying what `where` should hold."""
    if not isinstance(value, dict):
        raise InputFileError(
            f"{where} holds {json_kind(value)}, expected an object with keys {', '.join(keys)}"
        )
    return value


def require_keys(
    obj: dict, where: str, required: Iterable[str], optional: Iterable[str] = ()
) -> None:
    """InputFileError naming the missing keys of `required`, the valid keys, those `obj` has
    (the first `SHOWN`) and any of them that look like a misspelling of a missing one."""
    required, optional = list(required), list(optional)
    missing = [k for k in required if k not in obj]
    if missing:
        has = sorted(map(str, obj))
        shown = ", ".join(has[:SHOWN]) + (
            f" and {len(has) - SHOWN} more" if len(has) > SHOWN else ""
        )
        also = f", optional: {', '.join(optional)}" if optional else ""
        raise InputFileError(
            f"{where} has no {', '.join(repr(k) for k in missing)} (required keys: "
            f"{', '.join(required)}{also}; it has: {shown or 'none'}){_misspelt(has, missing)}"
        )


def refuse_unknown_keys(obj: dict, where: str, valid: Iterable[str]) -> None:
    """InputFileError naming the keys of `obj` that are not in `valid` (a misspelling)."""
    valid = list(valid)
    unknown = sorted(set(map(str, obj)) - set(valid))
    if unknown:
        raise InputFileError(
            f"{where} has unknown key{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(repr(k) for k in unknown)}; valid keys: {', '.join(valid)}"
            f"{_misspelt(unknown, valid)}"
        )


SHOWN = 12  # keys of an object listed in a message


def _misspelt(keys: Sequence[str], meant: Sequence[str]) -> str:
    """ "; did you mean 'taus' for 'tau'?" for each of `keys` close to one of `meant`."""
    pairs = []
    for key in keys:
        close = difflib.get_close_matches(key, meant, n=1, cutoff=0.75)
        if close and close[0] != key and abs(len(close[0]) - len(key)) <= 2:
            pairs.append(f"{close[0]!r} for {key!r}")
    return f"; did you mean {', '.join(pairs)}?" if pairs else ""


def is_positive_int(value: Any) -> bool:
    """True for an int >= 1 (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1

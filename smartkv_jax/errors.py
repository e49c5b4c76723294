"""Errors that mean "the input is wrong", not "the program is wrong".

Every layer raises these for bad arguments, missing or garbled files and unknown names; the
`smartkv` command turns them into one line `smartkv <command>: error: <message>` and exit
status 2, while any other exception is an internal error (exit status 1, traceback with
`--debug`). They subclass `ValueError` so callers that already catch `ValueError` keep working.

- `SmartKVError`: any user error (a bad argument value, an unknown name).
- `InputFileError`: a file or directory given by the user is missing, unreadable or garbled.
"""

from __future__ import annotations

import math


class SmartKVError(ValueError):
    """The user's input is wrong; the message says which input, its value and what is allowed."""


class InputFileError(SmartKVError):
    """A file or directory given by the user is missing, unreadable or not in its format."""


def check_range(
    name: str,
    value: float,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raise `SmartKVError` unless `value` is a finite number in the interval (`None`
    bounds: unbounded on that side).

    The message names the input, the value and the interval, e.g.
    `memory_fraction must be in (0, 1], got 1.5`.
    """
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high or not math.isfinite(value):
        interval = describe_range(low, high, low_open, high_open)
        raise SmartKVError(f"{name} must be {interval}, got {value}")


def describe_range(
    low: float | None, high: float | None, low_open: bool = False, high_open: bool = False
) -> str:
    """`in (0, 1]`, `>= 1`, `> 0`, `<= 100` for the interval's bounds."""
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{_num(low)}, {_num(high)}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {_num(low)}"
    if high is not None:
        return f"{'<' if high_open else '<='} {_num(high)}"
    return "a number"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)

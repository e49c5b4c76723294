"""The valid range of every numeric flag of the `smartkv` commands, checked on the parsed
arguments before a command starts any work (before a model is loaded).

`RANGES[command]` maps a flag's dest to its `Range`; list flags (nargs) are checked element by
element and unset (None) optional flags are skipped. `CROSS_CHECKS[command]` adds the checks
between flags. A bad value raises `SmartKVError` naming the flag, the value and the valid
range, e.g. `--budget must be in (0, 1], got 1.5`. Input files and directories named by flags
must exist (INPUT_PATHS) and output files must be writable (OUTPUT_FILES).
`smartkv_cli.errors` turns the error into one line and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path

from smartkv_jax.errors import InputFileError, SmartKVError, check_range
from smartkv_jax.jsonio import check_output_file


@dataclasses.dataclass(frozen=True)
class Range:
    """An interval of valid values; None: unbounded on that side."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def check(self, flag: str, value) -> None:
        """Raise `SmartKVError` unless `value` (or each element of a list) is in the range."""
        for v in _each(value):
            check_range(
                flag, v, self.low, self.high, low_open=self.low_open, high_open=self.high_open
            )


def _each(value) -> list:
    """The elements of a list flag, or [value] for a single one; None (unset) left out."""
    values = value if isinstance(value, (list, tuple)) else [value]
    return [v for v in values if v is not None]


AT_LEAST_1 = Range(1)
NON_NEGATIVE = Range(0)
POSITIVE = Range(0, low_open=True)
FRACTION = Range(0, 1, low_open=True)  # a memory budget: (0, 1]
TAU = Range(0, 1, low_open=True, high_open=True)  # an attention threshold: (0, 1)
NEEDLE_CONTEXT = Range(128)  # room for the needle, the question, the answer and a haystack
TOKENS = Range(2)  # a perplexity needs one predicted token

_SAMPLING = {"temperature": NON_NEGATIVE, "top_k": NON_NEGATIVE, "top_p": FRACTION}
_EVAL = {
    "memory": FRACTION,
    "tau": TAU,
    "n_boot": AT_LEAST_1,
    "books": AT_LEAST_1,
    "tokens": TOKENS,
    "chunk": AT_LEAST_1,
    "contexts": NEEDLE_CONTEXT,
    "depths": Range(0, 100),
    "needle_chunk": AT_LEAST_1,
    "max_new_tokens": AT_LEAST_1,
    "seed": NON_NEGATIVE,
}
_PROCESSES = {"num_processes": AT_LEAST_1, "process_id": NON_NEGATIVE}
_TRAIN = {
    "tau": TAU,
    "steps": AT_LEAST_1,
    "batch_size": AT_LEAST_1,
    "lr": POSITIVE,
    "weight_decay": NON_NEGATIVE,
    "warmup": NON_NEGATIVE,
    "huber_delta": POSITIVE,
    "exclude_sinks": NON_NEGATIVE,
    "seed": NON_NEGATIVE,
    "data_shards": AT_LEAST_1,
    "eval_every": NON_NEGATIVE,
    "eval_max_rows": NON_NEGATIVE,
    "ckpt_every": NON_NEGATIVE,
    "keep_checkpoints": NON_NEGATIVE,
    "hidden": NON_NEGATIVE,
    "pos_clip": AT_LEAST_1,
    "stop_after": AT_LEAST_1,
    "mesh_data": AT_LEAST_1,
    "mesh_model": AT_LEAST_1,
    **_PROCESSES,
}
RANGES: dict[str, dict[str, Range]] = {
    "generate": {
        "max_new_tokens": AT_LEAST_1,
        "chunk": AT_LEAST_1,
        "budget": FRACTION,
        "seed": NON_NEGATIVE,
        **_SAMPLING,
    },
    "parity": {"tokens": TOKENS},
    "calibrate": {"context": AT_LEAST_1, "budget": FRACTION, "tau": TAU, "discount": NON_NEGATIVE},
    "analyze": {"needle_context": NEEDLE_CONTEXT, "needle_depth": Range(0, 1)},
    "labels": {
        "window": TOKENS,
        "cap": AT_LEAST_1,
        "taus": TAU,
        "windows_per_doc": AT_LEAST_1,
        "first_window": NON_NEGATIVE,
        "facts": NON_NEGATIVE,
        "seed": NON_NEGATIVE,
        "chunk": AT_LEAST_1,
        **_PROCESSES,
    },
    "eval": _EVAL,
    "train-gates": _TRAIN,
}
FLAGS = {"keep_checkpoints": "--keep"}  # dests whose flag is not --<dest with dashes>


def flag_name(dest: str) -> str:
    """The command-line flag that sets `dest`."""
    return FLAGS.get(dest, "--" + dest.replace("_", "-"))


def _eval_cross(args: argparse.Namespace) -> None:
    if "ppl" in (getattr(args, "tasks", None) or ()) and hasattr(args, "tokens"):
        from eval.perplexity import check_chunk

        check_chunk(args.chunk, args.tokens, (flag_name("chunk"), flag_name("tokens")))


def _calibrate_cross(args: argparse.Namespace) -> None:
    if args.expiry and args.discount is not None:
        raise SmartKVError("--discount and --expiry exclude each other: --expiry ranks by "
                           "predicted expiry, which has no discount")  # fmt: skip


def _labels_cross(args: argparse.Namespace) -> None:
    if args.cap >= args.window:
        raise SmartKVError(f"--cap must be < --window ({args.window}), got {args.cap}")


def _train_cross(args: argparse.Namespace) -> None:
    if args.batch_size % args.data_shards:
        raise SmartKVError(
            f"--batch-size must be a multiple of --data-shards ({args.data_shards}), "
            f"got {args.batch_size}"
        )


def _processes_cross(args: argparse.Namespace) -> None:
    if None not in (args.process_id, args.num_processes) and args.process_id >= args.num_processes:
        raise SmartKVError(
            f"--process-id must be < --num-processes ({args.num_processes}), got "
            f"{args.process_id}: process ids count from 0"
        )


CROSS_CHECKS: dict[str, list[Callable[[argparse.Namespace], None]]] = {
    "calibrate": [_calibrate_cross],
    "eval": [_eval_cross],
    "labels": [_labels_cross, _processes_cross],
    "train-gates": [_train_cross, _processes_cross],
}

# flags naming inputs that must exist: dest -> "file", "dir" or "path" (either); list flags are
# checked element by element; NAMES and paths with "{mf}" in them are not paths to check
INPUT_PATHS: dict[str, dict[str, str]] = {
    "generate": {"gates": "dir", "calibrated": "path"},
    "parity": {"text_file": "file"},
    "calibrate": {"labels": "dir"},
    "analyze": {"labels": "dir", "gates": "dir"},
    "eval": {"gates": "dir", "calibrated": "path", "haystack": "dir", "text": "path"},
    "train-gates": {"train": "dir", "eval": "dir"},
}
NAMES = frozenset({"", "auto", "pg19", "local"})  # --text sources that are not paths
OUTPUT_FILES = {"calibrate": ("out",), "train-gates": ("out",)}  # checked before the work


def check_input_path(flag: str, value: str, kind: str) -> None:
    """Raise `InputFileError` unless `value` is an existing file / directory / either."""
    p = Path(value)
    if not p.exists():
        what = {"file": "file", "dir": "directory"}.get(kind, "file or directory")
        raise InputFileError(f"{flag} {value}: no such {what}")
    if kind == "file" and not p.is_file():
        raise InputFileError(f"{flag} {value}: not a file")
    if kind == "dir" and not p.is_dir():
        raise InputFileError(f"{flag} {value}: not a directory")


def _check_paths(command: str, args: argparse.Namespace) -> None:
    for dest, kind in INPUT_PATHS.get(command, {}).items():
        for v in _each(getattr(args, dest, None)):
            if v not in NAMES and "{mf}" not in v:
                check_input_path(flag_name(dest), v, kind)
    for dest in OUTPUT_FILES.get(command, ()):
        if getattr(args, dest, None):
            check_output_file(getattr(args, dest), flag_name(dest))


def validate_args(args: argparse.Namespace) -> None:
    """Check the parsed arguments of `args.command`: RANGES, CROSS_CHECKS, then the input
    paths (INPUT_PATHS) and output files (OUTPUT_FILES)."""
    command = getattr(args, "command", None)
    for dest, valid in RANGES.get(command, {}).items():
        if hasattr(args, dest):
            valid.check(flag_name(dest), getattr(args, dest))
    for check in CROSS_CHECKS.get(command, []):
        check(args)
    _check_paths(command, args)

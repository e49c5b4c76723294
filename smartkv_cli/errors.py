"""How the `smartkv` command ends: exit statuses and one-line error messages.

    0    done
    1    an internal error (a bug): one line that says to rerun with --debug (or
         SMARTKV_DEBUG=1), which prints the full traceback
    2    bad input: a flag out of range, a missing or garbled file, an unknown name
         (`smartkv_jax.errors.SmartKVError`, ValueError, the file errors in USER_ERRORS)
         or a flag argparse rejects; one line `smartkv <command>: error: <message>`
    130  interrupted (Ctrl-C): one line `smartkv <command>: interrupted`

Every command's parsed arguments are checked by `smartkv_cli.validate` before it runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence

from smartkv_cli.validate import validate_args

DEBUG_FLAG = "--debug"
DEBUG_ENV = "SMARTKV_DEBUG"
USER_ERRORS = (
    ValueError,  # includes SmartKVError, json.JSONDecodeError, UnicodeDecodeError
    ImportError,  # an optional package that is not installed
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    ConnectionError,  # the hub, offline
)
EXIT_INTERNAL, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line `<prog>: error: <message>` (exit 2);
    its subparsers are of this class too."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {one_line(message)} (see {self.prog} -h)\n")


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """--debug, for the help text (`run_command` takes it from anywhere on the line)."""
    parser.add_argument(
        DEBUG_FLAG,
        action="store_true",
        help=f"on an error, print the full traceback (anywhere on the line; or {DEBUG_ENV}=1)",
    )


def one_line(text: str) -> str:
    """`text`'s non-blank lines joined by "; "."""
    return "; ".join(line.strip() for line in str(text).splitlines() if line.strip())


def error_message(err: BaseException) -> str:
    """A one-line description of `err` (its file for an OSError, no quotes for a KeyError)."""
    if isinstance(err, OSError) and err.strerror and err.filename:
        text = f"{err.strerror}: {err.filename}"
    elif isinstance(err, KeyError) and err.args:
        text = str(err.args[0])
    else:
        text = str(err)
    return one_line(text) or type(err).__name__


def command_name(args: argparse.Namespace | None) -> str:
    """The "smartkv <command> [<subcommand>]" that `args` names (just "smartkv" before
    parsing)."""
    words = ["smartkv"]
    for dest in ("command", "eval_command"):
        if getattr(args, dest, None):
            words.append(getattr(args, dest))
    return " ".join(words)


def _debug_requested(argv: Sequence[str]) -> bool:
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _exit_code(stop: SystemExit) -> int:
    return stop.code if isinstance(stop.code, int) else int(stop.code is not None)


def _report(name: str, err: BaseException, debug: bool) -> int:
    """Print `err` as one line (after its traceback with `debug`); its exit status."""
    if debug:
        traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
    if isinstance(err, USER_ERRORS):
        print(f"{name}: error: {error_message(err)}", file=sys.stderr)
        return EXIT_USAGE
    print(
        f"{name}: internal error: {type(err).__name__}: {error_message(err)} (rerun with "
        f"{DEBUG_FLAG} or {DEBUG_ENV}=1 for the traceback)",
        file=sys.stderr,
    )
    return EXIT_INTERNAL


def run_command(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse `argv` (default: sys.argv[1:]), validate the arguments, run `args.func(args)`
    and turn whatever it raises into an exit status and one line on stderr."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_requested(argv)
    args = None
    try:
        args = parser.parse_args([a for a in argv if a != DEBUG_FLAG])
        validate_args(args)
        return args.func(args)
    except SystemExit as stop:  # argparse: --help, or a rejected flag (already printed)
        return _exit_code(stop)
    except KeyboardInterrupt:
        print(f"{command_name(args)}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        return _report(command_name(args), err, debug)

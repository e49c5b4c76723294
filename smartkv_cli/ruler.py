"""`smartkv eval ruler`: the RULER-style suite under cache policies, in the oneshot or the
streaming protocol, resumable, with a report (eval/ruler.py, eval/ruler_report.py).

    smartkv eval ruler --out runs/ruler --lengths 4096 --samples 20
    smartkv eval ruler --out runs/ruler_quick --quick     # 6 tasks, 10 samples, 12.5% and 25%
"""

from __future__ import annotations

import argparse
import dataclasses
from functools import partial
from pathlib import Path
from typing import Any

from eval.result_store import ResultStore
from eval.ruler import (
    QUICK_TASKS,
    RulerRun,
    RulerSettings,
    compare_runs,
    sample_source,
    split_cell,
    summarize,
)
from eval.ruler_report import comparison_markdown, write_ruler_report
from eval.ruler_tasks import TASKS
from smartkv_cli.flags import add_field, add_model_flags, add_results_flags, field_values
from smartkv_jax.errors import InputFileError
from smartkv_jax.jsonio import dumps

_RULER = RulerSettings()
QUICK_PRESET = {"tasks": QUICK_TASKS, "samples": 10, "memory": (0.125, 0.25)}


def add_ruler_cli(sub, memory_arg) -> None:
    """Add `ruler` to the `smartkv eval` subcommands."""
    r = sub.add_parser(
        "ruler",
        help="RULER-style suite (niah, variable tracking, word extraction, QA) by policy",
        description="Synthetic long-context tasks generated offline from a seed; every "
        "finished sample is stored in --out at once and skipped by a rerun. oneshot: the "
        "context is prefilled with the full cache, compressed once per policy and budget, then "
        "the question is read (kvpress's protocol); streaming: each policy evicts while the "
        "context is read.",
    )
    add_model_flags(r)
    r.add_argument("--out", default="ruler_results", help="results directory (resumable)")
    # tasks, samples and memory default to None (unset), so `--quick` sees what was given
    unset = {"default": None}
    add_field(
        r, "--tasks", _RULER, "tasks", choices=list(TASKS), help="tasks (default: all)", **unset
    )
    add_field(r, "--lengths", _RULER, "lengths", help="context lengths in tokens")
    add_field(
        r,
        "--samples",
        _RULER,
        "samples",
        help=f"samples per task and length (default {_RULER.samples}; more than an --out "
        "directory holds extends it)",
        **unset,
    )
    add_field(r, "--seed", _RULER, "seed", help="seed of the samples")
    add_field(r, "--protocol", _RULER, "protocol", choices=["oneshot", "streaming"])
    add_field(r, "--policies", _RULER, "policies", help="policies (as `smartkv eval`)")
    add_field(
        r,
        "--memory",
        _RULER,
        "memory",
        type=memory_arg,
        help=f"memory fractions (default {' '.join(f'{m:g}' for m in _RULER.memory)})",
        **unset,
    )
    add_field(r, "--calibrated", _RULER, "calibrated", help="for hybrid-calibrated")
    add_field(r, "--fmt", _RULER, "fmt", choices=["auto", "chat", "plain"], help="prompt format")
    add_field(r, "--essays", _RULER, "essays", help="haystack .txt directory or file")
    add_field(r, "--books", _RULER, "books", help="books for words and QA passages")
    add_field(r, "--chunk", _RULER, "chunk", help="prefill chunk (tokens)")
    r.add_argument("--gates", default=None, help="gate checkpoint (gated and hybrid policies)")
    r.add_argument(
        "--quick",
        action="store_true",
        help=f"preset: tasks {' '.join(QUICK_TASKS)}, 10 samples, budgets 12.5%% and 25%% "
        "(--tasks, --samples or --memory given beside it replace that part of the preset)",
    )
    r.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite the report and print the averages of the samples --out holds, running "
        "nothing (say, of a sweep stopped early); the other run flags are ignored",
    )
    r.add_argument(
        "--against",
        metavar="DIR",
        default=None,
        help="another RULER results directory of the same samples (model, seed, format and "
        "text alike): also print each policy of --out minus each of DIR's, paired on the "
        "samples both hold (say, a policy rerun with other gates against the first sweep)",
    )
    add_results_flags(r)
    r.set_defaults(func=cmd_ruler)


def settings_from_args(args: argparse.Namespace) -> RulerSettings:
    """The run's settings; tasks, samples and memory not given come from `--quick`'s preset
    or else the settings' defaults (`--quick --memory 0.5`: the preset's tasks and samples at
    50%; `--quick --samples 20`: 20 samples)."""
    values = field_values(RulerSettings, args)
    unset = [k for k in QUICK_PRESET if values[k] is None]
    for k in unset:
        del values[k]
    if args.quick:
        values.update({k: QUICK_PRESET[k] for k in unset})
    return RulerSettings(**values)


def cmd_ruler(args: argparse.Namespace) -> int:
    from smartkv_cli.eval import load_model

    against = _stored_run(args.against, "--against") if args.against else None
    if args.report_only:
        stored = _stored_run(args.out)
        if against:
            config = stored[0].config()
            _check_same_samples(sample_source(config["model"], config["ruler"]), against)
        return _print_report(args, *stored, against)
    settings = settings_from_args(args)
    settings.check()
    if against:
        _check_same_samples(sample_source(args.model, dataclasses.asdict(settings)), against)
    m = load_model(args.model, args.dtype, args.mesh)
    gates = None
    if args.gates:
        from smartkv_jax.gate_checkpoint import load_gates

        gates = load_gates(args.gates)[0]
    store = ResultStore(args.out, overwrite=args.overwrite)
    store.check_config("model", args.model)
    write = partial(write_ruler_report, store.dir, protocol=settings.protocol)
    # the report is rewritten after every sample, so a long sweep stopped early has one
    run = RulerRun(store, m.model, m.tokenizer, settings, gates, not args.no_progress, write)
    return _print_report(args, store, run.run(), settings.protocol, against)


Stored = tuple[ResultStore, list[dict[str, Any]], str]  # (store, rows, protocol)


def _stored_run(out_dir: str, flag: str = "--out") -> Stored:
    """(store, rows, protocol) of a RULER results directory that holds samples."""
    if not (Path(out_dir) / "config.json").is_file():
        raise InputFileError(f"{flag} {out_dir}: no RULER results there (no config.json)")
    store = ResultStore(out_dir)
    stored, rows = store.config().get("ruler"), store.rows()
    if not stored or not rows:
        raise InputFileError(f"{flag} {out_dir}: holds no RULER samples")
    return store, rows, stored["protocol"]


def _check_same_samples(mine: dict[str, Any], other: Stored) -> None:
    """Refuse to pair a run whose `sample_source` is `mine` with `other` when a key could
    name different samples in the two."""
    config = other[0].config()
    theirs = sample_source(config["model"], config["ruler"])
    for name, value in mine.items():
        if theirs[name] != value:
            raise InputFileError(
                f"--against {other[0].dir}: its samples differ from --out's ({name} "
                f"{theirs[name]!r} there, {value!r} here)"
            )


def _print_report(
    args, store: ResultStore, rows: list[dict[str, Any]], protocol: str, against: Stored | None
) -> int:
    """Write the report of `rows` into the store and print the averages, the time per
    sample and the paired comparison with the run `against` (one JSON object with --json)."""
    report = write_ruler_report(store.dir, rows, protocol)
    out: dict[str, Any] = {"report": str(report), "average": _averages(rows)}
    out["seconds_per_sample"] = sum(r["seconds"] for r in rows) / max(1, len(rows))
    out["prefill_s_per_sample"] = sum(r["prefill_s"] for r in rows) / max(1, len(rows))
    if against:
        out["against"] = _gaps(rows, against[1])
    if args.json:
        print(dumps(out, indent=2))
        return 0
    for a in out["average"]:
        print(
            f"{a['length']:>6} {a['policy']:<20} {a['budget']:>6.3f} "
            f"memory {a['memory']:.3f}  score {a['score']:.1f}"
        )
    print(f"report: {report}; {out['seconds_per_sample']:.1f} s per sample")
    if against:
        print("\n" + comparison_markdown(rows, against[1], str(against[0].dir)))
    return 0


def _gaps(rows, against_rows) -> list[dict[str, Any]]:
    """`compare_runs` as JSON rows: ours minus the other run's policy at a budget, with the
    95% interval's half-width."""
    out = []
    for (length, ours), gaps in compare_runs(rows, against_rows).items():
        for (policy, budget), (gap, err) in gaps.items():
            out.append(
                {"length": length, "policy": ours, "against": policy, "budget": budget,
                 "gap": gap, "ci95": 1.96 * err}
            )  # fmt: skip
    return out


def _averages(rows) -> list[dict[str, Any]]:
    s = summarize(rows)
    out = []
    for (length, cell), v in s["average"].items():
        policy, budget = split_cell(cell)
        out.append(
            {
                "length": length,
                "policy": policy,
                "budget": budget,
                "memory": s["memory"][length, cell],
                "score": v,
            }
        )
    return out

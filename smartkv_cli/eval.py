"""`smartkv eval ppl|needle|report|ruler`: policy x memory sweeps and their report.

    smartkv eval ppl    --out runs/eval --policies window hybrid oracle --memory 0.125
    smartkv eval needle --out runs/eval --contexts 1024 2048 --depths 0 50 100
    smartkv eval report --out runs/eval            # runs what is missing, then writes
                                                   # runs/eval/report.md and its PNGs

The flags that set a field of the sweep's settings (eval/sweep_settings.py) take their type
and default from it. See docs/design.md (evaluation).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from eval.markdown import ci, num, pct
from eval.needle import FORMATS
from eval.report import write_report
from eval.result_store import ResultStore
from eval.statistics import comparisons, summary_rows
from eval.sweep import run_sweep
from eval.sweep_settings import (
    TASKS,
    NeedleSettings,
    PerplexitySettings,
    SweepSettings,
    sweep_entries,
)
from smartkv_cli.errors import OneLineParser, run_command
from smartkv_cli.flags import (
    add_field,
    add_model_flags,
    add_results_flags,
    field_values,
    place_model,
)
from smartkv_cli.ruler import add_ruler_cli
from smartkv_jax.config import ModelConfig
from smartkv_jax.jsonio import dumps

_PPL, _NEEDLE, _SWEEP = PerplexitySettings(), NeedleSettings(), SweepSettings()


def _memory_arg(text: str) -> float:
    """A memory fraction written 0.125 or 12.5% (its range: smartkv_cli/validate.py)."""
    try:
        return float(text.rstrip("%")) / (100 if text.endswith("%") else 1)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a fraction (0.125) or percentage (12.5%): {text!r}"
        ) from None


def _add_common(p: argparse.ArgumentParser) -> None:
    add_model_flags(p)
    p.add_argument("--out", default="eval_results", help="results directory (resumable)")
    add_field(
        p,
        "--policies",
        _SWEEP,
        "policies",
        help="policies to sweep: full window recent h2o tova snapkv knorm random adakv "
        "keydiff expected pyramidkv gated-only hybrid hybrid-calibrated oracle, or .json "
        "policy tables (streaming, adakv runs as snapkv); a ':mask' suffix "
        "(oracle:mask, hybrid:mask) hides expired slots from attention; ':adaptive' lets "
        "gated layers share their budget among KV heads in a oneshot compression; "
        "hybrid-calibrated:expiry ranks its gated keys by predicted expiry instead of "
        "age-discounted predicted life; ':discount=X' sets that age discount (predicted "
        "log4 life - X * log4(1 + age))",
    )
    add_field(
        p,
        "--memory",
        _SWEEP,
        "memory",
        type=_memory_arg,
        help="memory fractions of the full cache (0.125 or 12.5%%)",
    )
    add_field(
        p,
        "--calibrated",
        _SWEEP,
        "calibrated",
        help="for hybrid-calibrated: a label store (the table is derived for every context and "
        "budget, as `smartkv calibrate` does) or a JSON policy table; {mf} in a table's path is "
        "replaced by the budget",
    )
    p.add_argument("--gates", default=None, help="gate checkpoint directory (smartkv train-gates)")
    p.add_argument(
        "--random-gates",
        action="store_true",
        help="untrained random gates (to check the gated plumbing only)",
    )
    add_field(p, "--tau", _SWEEP, "tau", help="oracle labelling threshold")
    add_field(p, "--n-boot", _SWEEP, "n_boot", help="bootstrap resamples")
    add_results_flags(p)


def _add_ppl(p: argparse.ArgumentParser) -> None:
    add_field(
        p,
        "--text",
        _PPL,
        "text",
        help='"auto" (PG-19 test split if the hub is reachable, else the local books), "pg19", '
        '"local" (../shared/data/gutenberg or $SMARTKV_TEXT_DIR), or a directory of .txt '
        "files / one file",
    )
    add_field(p, "--books", _PPL, "books", help="books (batch rows)")
    add_field(p, "--tokens", _PPL, "tokens", help="tokens per book")
    add_field(
        p,
        "--chunk",
        _PPL,
        "chunk",
        help="tokens per step: 1 is the exact protocol, more is a faster approximation",
    )
    add_field(p, "--pg19-dataset", _PPL, "pg19_dataset")


def _add_needle(p: argparse.ArgumentParser) -> None:
    add_field(p, "--haystack", _NEEDLE, "haystack", help="directory of .txt (default: PG essays)")
    add_field(p, "--contexts", _NEEDLE, "contexts")
    p.add_argument(
        "--depths",
        nargs="+",
        type=float,
        default=[100 * d for d in _NEEDLE.depths],
        help="needle depths in percent of the haystack",
    )
    add_field(
        p,
        "--format",
        _NEEDLE,
        "fmt",
        choices=FORMATS,
        dest="fmt",
        help="prompt format: chat template, plain Question/Answer, or auto (chat if the "
        "tokenizer has a template)",
    )
    add_field(p, "--needle-chunk", _NEEDLE, "chunk", help="prefill chunk")
    add_field(p, "--max-new-tokens", _NEEDLE, "max_new_tokens")
    add_field(p, "--seed", _NEEDLE, "seed", help="needle numbers")


def add_eval_cli(subparsers) -> argparse.ArgumentParser:
    """Add `eval ppl|needle|report` to the `smartkv` command's subparsers."""
    ev = subparsers.add_parser(
        "eval",
        help="perplexity, needle retrieval and the policy x memory report",
        description="Sweeps over policies and memory budgets, resumable: every finished "
        "(task, policy, budget) is stored in --out at once and skipped by a rerun.",
    )
    sub = ev.add_subparsers(dest="eval_command", required=True)
    p = sub.add_parser("ppl", help="streaming perplexity (StreamingLLM protocol)")
    _add_common(p)
    _add_ppl(p)
    p.set_defaults(func=cmd_eval, tasks=["ppl"])
    n = sub.add_parser("needle", help="needle in a haystack")
    _add_common(n)
    _add_needle(n)
    n.set_defaults(func=cmd_eval, tasks=["needle"])
    r = sub.add_parser("report", help="run what is missing and write report.md + PNGs")
    _add_common(r)
    _add_ppl(r)
    _add_needle(r)
    add_field(r, "--tasks", _SWEEP, "tasks", choices=TASKS)
    r.add_argument("--no-run", action="store_true", help="only render the stored results")
    r.set_defaults(func=cmd_eval)
    add_ruler_cli(sub, _memory_arg)
    return ev


def settings_from_args(args: argparse.Namespace) -> SweepSettings:
    """The sweep's settings from the flags (a task's settings at their defaults when its
    subcommand has no flags for them); --depths is in percent."""
    needle = field_values(NeedleSettings, args, chunk="needle_chunk")
    if "depths" in needle:
        needle["depths"] = tuple(d / 100 for d in needle["depths"])
    return SweepSettings(
        **field_values(SweepSettings, args),
        ppl=PerplexitySettings(**field_values(PerplexitySettings, args)),
        needle=NeedleSettings(**needle),
    )


def load_eval_gates(args: argparse.Namespace, cfg: ModelConfig):
    """(gates, description) from --gates / --random-gates, or (None, None)."""
    if args.gates:
        from smartkv_jax.gate_checkpoint import load_gates

        gates, meta = load_gates(args.gates)
        info = {
            "checkpoint": str(Path(args.gates).resolve()),
            **{k: meta.get(k) for k in ("model", "tau", "step", "checksum")},
        }
        return gates, info
    if args.random_gates:
        import jax

        from smartkv_jax.gates import GateConfig, init_gates

        gcfg = GateConfig(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
        return init_gates(gcfg, jax.random.PRNGKey(0)), {"random_init": True, "seed": 0}
    return None, None


def load_model(name: str, dtype_name: str = "float32", mesh: tuple[int, int] | None = None):
    """The model, tokenizer and source (smartkv_jax.convert.load_model), the model placed on
    the --mesh (`place_model`)."""
    from smartkv_jax.convert import DTYPES
    from smartkv_jax.convert import load_model as _load

    m = _load(name, DTYPES[dtype_name])
    place_model(m.model, mesh)
    return m


def cmd_eval(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    run = not getattr(args, "no_run", False)
    if run:
        m = load_model(args.model, args.dtype, args.mesh)
        gates, info = load_eval_gates(args, m.cfg)
        run_sweep(
            args.out,
            m.model,
            m.tokenizer,
            settings,
            model_name=args.model,
            gates=gates,
            gates_info=info,
            progress=not args.no_progress,
            overwrite=args.overwrite,
        )
    store = ResultStore(args.out)
    keys = {e.key for e in sweep_entries(settings)} if run else None
    rows = [r for r in store.rows() if keys is None or r["key"] in keys]
    out: dict[str, Any] = {"results": summary_rows(rows), "out": str(store.dir)}
    if args.eval_command == "report":
        out["report"] = str(write_report(args.out, n_boot=args.n_boot))
        out["comparisons"] = comparisons(store, store.rows(), args.n_boot)
    if args.json:
        print(dumps(out, indent=2))
    else:
        _print_text(out)
    return 0


def _print_text(out: dict[str, Any]) -> None:
    print(_text_table(out["results"]))
    for c in out.get("comparisons", []):
        print(
            f"{c['policy']} @ {pct(c['memory_fraction'])}: "
            f"gap closed {num(c['gap_closed'])}, vs full {ci(c['vs_full'])}, "
            f"vs window {ci(c['vs_window'])}"
        )
    if "report" in out:
        print(f"report: {out['report']}")


def _text_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [f"{'policy':<20} {'memory':>8} {'actual':>8} {'ppl':>10} {'needle':>7}"]
    for r in rows:
        lines.append(
            f"{r['policy']:<20} {pct(r['memory_fraction']):>8} {pct(r['memory_actual']):>8} "
            f"{num(r['ppl']):>10} {num(r['needle_accuracy'], '.2f'):>7}"
            + (f"  ({r['error']})" if r.get("error") else "")
            + (f"  [{r['note']}]" if r.get("note") else "")
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m smartkv_cli.eval ppl|needle|report ...` (the same as `smartkv eval ...`)."""
    parser = OneLineParser(prog="smartkv")
    add_eval_cli(parser.add_subparsers(dest="command", required=True))
    return run_command(parser, ["eval", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())

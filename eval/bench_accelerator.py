"""The accelerator benchmark: prefill and decode of real model shapes with random weights, full
cache against the hybrid policy at a budget, on one GPU or TPU host, written as JSON.

    python -m eval.bench_accelerator                       # the default cases, bf16
    python -m eval.bench_accelerator --models llama-3.1-8b --contexts 32768 --batches 4

Needs only this repository and a JAX install (CUDA or TPU) with flax: no download, no PyTorch
(eval/bench_case.py is the whole path). Weights are random (`random:NAME` shapes,
smartkv_jax/model_shapes.py), so only speed and memory mean anything here. On a TPU the cache
kernels run in Pallas (smartkv_jax/kernels.py), elsewhere the XLA reference path.

Each model is built once and runs its cases in this process, in order; a case that runs out of
device memory is recorded as such and the run goes on. The JSON is rewritten after every case,
so a run cut short keeps what it measured, and cases that would start after --max-seconds are
listed as skipped. peak_bytes is this process's peak so far (the device's peak bytes in use on
an accelerator), not the case's own: for one case's peak run it alone with eval/bench_case.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

import jax

from eval.bench_case import Case, case_model, random_gates, run_case
from smartkv_jax.jsonio import write_json
from smartkv_jax.model_shapes import MODEL_SHAPES, RANDOM_PREFIX

DEFAULT_MODELS = ("llama-3.1-8b", "qwen2.5-0.5b", "smollm2-135m")
DEFAULT_CONTEXTS = (8192, 32768)
DEFAULT_BATCHES = (1, 4, 8)


def plan_cases(args: argparse.Namespace) -> list[Case]:
    """Every (model, context, batch, policy) asked for, model by model, smallest first
    within a model (so a model's memory grows case by case)."""
    cases = []
    for name in args.models:
        for ctx in sorted(args.contexts):
            for batch in sorted(args.batches):
                for policy in args.policies:
                    cases.append(
                        Case(
                            RANDOM_PREFIX + name, ctx, batch, policy, args.budget,
                            args.new_tokens, args.dtype, args.chunk, layers=args.layers,
                        )
                    )  # fmt: skip
    return cases


def _is_out_of_memory(err: Exception) -> bool:
    text = str(err).lower()
    return "resource_exhausted" in text or "out of memory" in text


def run_model(cases: list[Case], deadline: float, report) -> None:
    """One model's cases, in order, until `deadline` (perf_counter seconds); `report(row)`
    receives each case's figures, an out-of-memory record, or a skipped record."""
    m, gates = None, None
    for case in cases:
        if time.perf_counter() > deadline:
            report({**dataclasses.asdict(case), "skipped": "past --max-seconds"})
            continue
        if m is None:  # built once, with room for the model's longest case
            m = case_model(max(cases, key=lambda c: c.context + c.new_tokens))
            gates = random_gates(m)
        try:
            report(run_case(m, case, gates))
        except Exception as err:  # noqa: BLE001 - one failing case must not end the run
            if not _is_out_of_memory(err):
                raise
            report({**dataclasses.asdict(case), "error": "out of device memory"})


def summary_line(row: dict[str, Any]) -> str:
    """One printed line per case."""
    what = f"{row['model']} ctx {row['context']} batch {row['batch']} {row['policy']}"
    if "skipped" in row or "error" in row:
        return f"{what}: {row.get('skipped') or row.get('error')}"
    return (
        f"{what}: compile {row['compile_s']:.1f} s, prefill {row['prefill_s']:.2f} s "
        f"({row['prefill_tok_s']:.0f} tok/s), decode {row['decode_tok_s']:.1f} tok/s, "
        f"KV {row['kv_bytes'] / 2**30:.2f} GiB, peak so far {row['peak_bytes'] / 2**30:.2f} GiB, "
        f"prefill step (XLA) {(row['step_bytes'] or 0) / 2**30:.2f} GiB"
    )


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--models", nargs="+", default=list(DEFAULT_MODELS), choices=sorted(MODEL_SHAPES),
        help="model shapes (random weights)",
    )  # fmt: skip
    ap.add_argument("--contexts", type=int, nargs="+", default=list(DEFAULT_CONTEXTS))
    ap.add_argument("--batches", type=int, nargs="+", default=list(DEFAULT_BATCHES))
    ap.add_argument("--policies", nargs="+", default=["full", "hybrid"])
    ap.add_argument("--budget", type=float, default=0.25, help="memory fraction of hybrid")
    ap.add_argument("--new-tokens", type=int, default=64, help="decoded tokens per row")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--chunk", type=int, default=256, help="prefill chunk (tokens)")
    ap.add_argument("--layers", type=int, default=None, help="first N layers only (tests)")
    ap.add_argument(
        "--max-seconds", type=float, default=450.0,
        help="start no case after this many seconds (the rest are listed as skipped)",
    )  # fmt: skip
    ap.add_argument("--out", default="results/bench_accelerator.json", help="JSON written here")
    args = ap.parse_args(argv)
    if min(args.contexts) < 1 or min(args.batches) < 1 or args.new_tokens < 2:
        ap.error("--contexts and --batches must be >= 1 and --new-tokens >= 2")
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = _parse_args(argv)
    t0 = time.perf_counter()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    head = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend()}

    def report(row: dict[str, Any]) -> None:
        rows.append(row)
        print(summary_line(row), flush=True)
        write_json(out, {**head, "wall_s": time.perf_counter() - t0, "cases": rows}, indent=2)

    cases = plan_cases(args)
    for name in args.models:
        mine = [c for c in cases if c.model == RANDOM_PREFIX + name]
        run_model(mine, t0 + args.max_seconds, report)
    print(f"wrote {out} ({len(rows)} cases, {time.perf_counter() - t0:.0f} s)")
    return rows


if __name__ == "__main__":
    main()

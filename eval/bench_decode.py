"""Prefill and decode speed, KV bytes and peak memory: our jitted generate under cache policies
vs transformers' PyTorch generate (full cache), same model, same CPU.

    python -m eval.bench_decode [--contexts 4096 8192] [--batches 1 8] [--new-tokens 64]
                                [--policies full hybrid] [--budget 0.25] [--gates CKPT]
                                [--calibrated LABELS]  (for --policies hybrid-calibrated)
    python -m eval.bench_decode --model random:qwen2.5-0.5b --contexts 32768 --batches 1 \
                                --no-torch             (random weights of a real shape)

Each (context, batch, policy) runs in a process of its own (eval/bench_case.py), so its peak
memory (resident set: weights, cache, activations and runtime, counted from when its programs
are compiled) is that case's alone; "step MiB" is XLA's own accounting of one prefill chunk
step (weights, cache and the step's working memory), free of the runtime and the compiler.
Prompts are real text (the shared books), one offset per batch row; random token ids for
random models.
Prefill: time to the first token of a compiled program (compile time is reported apart);
PyTorch's: from the call to its first sampled token. Decode rate: batch x (new_tokens - 1)
tokens over the decode loop's time; PyTorch's runs from its first sampled token to its last.
KV bytes are the keys and values our cache allocates (PyTorch's full cache holds as many as
our full policy).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import jax
from tqdm import tqdm

from eval.bench_case import Case, book_prompts, case_in_subprocess
from smartkv_jax.convert import DEFAULT_MODEL, load_tokenizer
from smartkv_jax.jsonio import dumps, write_table_and_rows
from smartkv_jax.model_shapes import RANDOM_PREFIX
from smartkv_jax.parity import torch_model


def time_torch(hf, prompts, new_tokens: int) -> dict[str, float]:
    """Prefill seconds and decode tokens/s of transformers' generate: a logits processor
    stamps every step, so prefill runs from the call to the first sampled token and decode
    from the first sampled token to the last."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class Stamp(LogitsProcessor):
        def __init__(self):
            self.times: list[float] = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    ids = torch.tensor(prompts)
    stamp = Stamp()
    with torch.no_grad():
        hf.generate(ids[:, :8], max_new_tokens=2, do_sample=False)  # first-call warm-up
        t0 = time.perf_counter()
        hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            logits_processor=LogitsProcessorList([stamp]),
        )
    decode_s = stamp.times[-1] - stamp.times[0]
    return {
        "torch_prefill_s": stamp.times[0] - t0,
        "torch_tok_s": len(prompts) * (len(stamp.times) - 1) / decode_s,
    }


def torch_in_subprocess(args, ctx: int, batch: int) -> dict[str, float]:
    """PyTorch runs in a fresh process: its OpenMP threads spin after each op and would
    otherwise steal the cores from our measurements (and ours from its)."""
    cmd = [sys.executable, "-m", "eval.bench_decode", "--model", args.model]
    cmd += ["--new-tokens", str(args.new_tokens), "--torch-child", str(ctx), str(batch)]
    if args.text:
        cmd += ["--text", args.text]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"PyTorch benchmark failed: {out.stderr[-800:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL, help="a model name or random:NAME")
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument(
        "--policies",
        nargs="+",
        default=["full", "hybrid"],
        help="our cache policies to time: names as in `smartkv eval report` or .json tables",
    )
    ap.add_argument(
        "--budget", type=float, default=0.25, help="memory fraction of non-full policies"
    )
    ap.add_argument("--chunk", type=int, default=512, help="our prefill chunk (tokens)")
    ap.add_argument("--dtype", default="float32", help="our compute dtype")
    ap.add_argument("--gates", default=None, help="gate checkpoint (default: random gates)")
    ap.add_argument(
        "--calibrated",
        default=None,
        help="label store for the hybrid-calibrated policy (its table is derived per context)",
    )
    ap.add_argument("--text", default=None, help="directory of .txt files (default: shared books)")
    ap.add_argument("--no-torch", action="store_true", help="time only our implementation")
    ap.add_argument("--out", default="results/bench_decode", help="writes OUT.md and OUT.json")
    ap.add_argument("--torch-child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.model.startswith(RANDOM_PREFIX):
        args.no_torch = True  # transformers has no random model of ours to compare with
    return args


def _torch_child(args: argparse.Namespace) -> None:
    """One PyTorch measurement in its own process: prints its prefill_s and tok_s as JSON."""
    ctx, batch = args.torch_child
    hf = torch_model(args.model)
    prompts = book_prompts(load_tokenizer(args.model), batch, ctx, args.text)
    print(dumps(time_torch(hf, prompts, args.new_tokens)))


def _measure(args: argparse.Namespace) -> list[dict]:
    """One row per (context, batch): PyTorch's prefill and decode, then each policy's case."""
    rows = []
    cases = [(c, b) for c in args.contexts for b in args.batches]
    nan = {"torch_prefill_s": float("nan"), "torch_tok_s": float("nan")}
    for ctx, batch in tqdm(cases, desc="decode benchmark"):
        row = {"context": ctx, "batch": batch}
        row.update(nan if args.no_torch else torch_in_subprocess(args, ctx, batch))
        for name in args.policies:
            case = Case(
                args.model, ctx, batch, name, args.budget, args.new_tokens, args.dtype,
                args.chunk, args.text, args.calibrated,
            )  # fmt: skip
            row[name] = case_in_subprocess(case, args.gates)
        rows.append(row)
        tqdm.write(dumps(row))
    return rows


def _table_head(policies: list[str]) -> list[str]:
    """Column names: PyTorch's prefill and decode, then per policy its figures and ratios."""
    base = policies[0]
    head = ["context", "batch", "torch prefill s", "torch tok/s"]
    for name in policies:
        head += [f"{name} prefill s", f"{name} prefill vs torch", f"{name} tok/s"]
        head += [f"{name} / torch", f"{name} KV MiB", f"{name} peak MiB", f"{name} step MiB"]
        if name != base:
            head += [f"{name} / {base} speed", f"{name} / {base} KV"]
    return head


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.0f}"


def _table_cells(r: dict, policies: list[str]) -> list[str]:
    """The cells of one measured row, in `_table_head`'s order. "prefill vs torch": PyTorch's
    prefill time over ours (above 1: ours is faster)."""
    base = r[policies[0]]
    cells = [str(r["context"]), str(r["batch"])]
    cells += [f"{r['torch_prefill_s']:.2f}", f"{r['torch_tok_s']:.1f}"]
    for name in policies:
        c = r[name]
        cells += [f"{c['prefill_s']:.2f}", f"{r['torch_prefill_s'] / c['prefill_s']:.2f}x"]
        cells += [f"{c['decode_tok_s']:.1f}", f"{c['decode_tok_s'] / r['torch_tok_s']:.2f}x"]
        cells += [f"{c['kv_bytes'] / 2**20:.1f}", f"{c['peak_bytes'] / 2**20:.0f}"]
        cells += [_mib(c["step_bytes"])]
        if name != policies[0]:
            cells += [
                f"{c['decode_tok_s'] / base['decode_tok_s']:.2f}x",
                f"{c['kv_bytes'] / base['kv_bytes']:.3f}",
            ]
    return cells


def _table(rows: list[dict], args: argparse.Namespace) -> str:
    """The Markdown report: a header line, then one table row per measured row."""
    head = _table_head(args.policies)
    lines = [
        f"model: {args.model}; new tokens: {args.new_tokens}; {args.dtype}; "
        f"{jax.devices()[0].device_kind}; budget {args.budget}; chunk {args.chunk}; "
        f"gates: {args.gates or 'random init (speed only)'}",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---:|" * len(head),
    ]
    for r in rows:
        lines.append("| " + " | ".join(_table_cells(r, args.policies)) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    if args.torch_child:  # one PyTorch measurement in its own process
        _torch_child(args)
        return
    rows = _measure(args)
    table = _table(rows, args)
    print(table)
    write_table_and_rows(args.out, table, rows)


if __name__ == "__main__":
    main()

"""Decode speed and KV memory: our jitted generate under cache policies vs transformers'
PyTorch generate (full cache), same model, same CPU.

    python -m eval.bench_decode [--contexts 1024 4096] [--batches 1 8] [--new-tokens 128]
                                [--policies full hybrid] [--budget 0.25] [--gates CKPT]
                                [--calibrated LABELS]  (for --policies hybrid-calibrated)

Prompts are real text (the shared books), one offset per batch row. Decode rate is
batch x (new_tokens - 1) new tokens over decode time: ours times its decode loop (compiled
beforehand); for PyTorch, the time from the first to the last sampled token, stamped by a
logits processor. Prefill is excluded from both. KV bytes are the keys and values
our cache allocates (PyTorch's full cache holds the same number as our full policy).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import jax
from tqdm import tqdm

from smartkv_jax.convert import DEFAULT_MODEL, load_model, load_tokenizer
from smartkv_jax.data import read_text, text_files
from smartkv_jax.generate import generate
from smartkv_jax.jsonio import dumps, write_json, write_text_atomic
from smartkv_jax.parity import torch_model


def book_prompts(tokenizer, n_rows: int, n_tokens: int, source=None) -> list[list[int]]:
    """`n_rows` prompts of `n_tokens` tokens from the text source, at different offsets."""
    ids: list[int] = []
    for f in text_files(source):
        ids += tokenizer(read_text(f)).input_ids
        if len(ids) >= n_rows * n_tokens:
            break
    if len(ids) < n_tokens:
        raise ValueError(f"the text source holds only {len(ids)} tokens, need {n_tokens}")
    step = max(1, (len(ids) - n_tokens) // max(n_rows, 1))
    return [ids[i * step : i * step + n_tokens] for i in range(n_rows)]


def time_ours(m, prompts, new_tokens: int, policy, gates) -> tuple[float, int]:
    """(decode tokens/s, KV bytes) of our generate under `policy`."""
    res = generate(m.model, prompts, new_tokens, stop_tokens=(), policy=policy, gates=gates)
    return res.decode_tokens_per_s, res.cache.kv_bytes()


def time_torch(hf, prompts, new_tokens: int) -> float:
    """Decode tokens/s of transformers' generate: a logits processor stamps the time of every
    step, so decode time runs from the first sampled token to the last (one prefill)."""
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
        hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            logits_processor=LogitsProcessorList([stamp]),
        )
    return len(prompts) * (len(stamp.times) - 1) / (stamp.times[-1] - stamp.times[0])


def torch_in_subprocess(args, ctx: int, batch: int) -> float:
    """PyTorch runs in a fresh process: its OpenMP threads spin after each op and would
    otherwise steal the cores from our measurements (and ours from its)."""
    cmd = [
        sys.executable,
        "-m",
        "eval.bench_decode",
        "--model",
        args.model,
        "--new-tokens",
        str(args.new_tokens),
        "--torch-child",
        str(ctx),
        str(batch),
    ]
    if args.text:
        cmd += ["--text", args.text]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"PyTorch benchmark failed: {out.stderr[-800:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["torch_tok_s"]


def _gates(m, ckpt: str | None):
    """Trained gates from `ckpt`, or random ones (which cost the same) for a speed-only run."""
    from smartkv_jax import gates as gate_mod

    if ckpt:
        from smartkv_jax.gate_checkpoint import load_gates

        return load_gates(ckpt)[0], ckpt
    cfg = gate_mod.GateConfig(m.cfg.num_layers, m.cfg.num_kv_heads, m.cfg.head_dim)
    return gate_mod.init_gates(cfg, jax.random.PRNGKey(0)), "random init (speed only)"


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument(
        "--policies",
        nargs="+",
        default=["full"],
        help="our cache policies to time: names as in `smartkv eval report` or .json tables",
    )
    ap.add_argument(
        "--budget", type=float, default=0.25, help="memory fraction of non-full policies"
    )
    ap.add_argument("--gates", default=None, help="gate checkpoint (default: random gates)")
    ap.add_argument(
        "--calibrated",
        default=None,
        help="label store for the hybrid-calibrated policy (its table is derived per context)",
    )
    ap.add_argument("--text", default=None, help="directory of .txt files (default: shared books)")
    ap.add_argument("--no-torch", action="store_true", help="time only our implementation")
    ap.add_argument("--out", default="results/bench_decode")
    ap.add_argument("--torch-child", nargs=2, type=int, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def _torch_child(args: argparse.Namespace) -> None:
    """One PyTorch measurement in its own process: prints {"torch_tok_s": ...} as JSON."""
    ctx, batch = args.torch_child
    hf = torch_model(args.model)
    prompts = book_prompts(load_tokenizer(args.model), batch, ctx, args.text)
    print(dumps({"torch_tok_s": time_torch(hf, prompts, args.new_tokens)}))


def _measure(m, args: argparse.Namespace, gates) -> list[dict]:
    """One row per (context, batch): PyTorch's tokens/s, then each policy's tokens/s and KV
    bytes."""
    from train.policy_names import parse_policy

    rows = []
    cases = [(c, b) for c in args.contexts for b in args.batches]
    for ctx, batch in tqdm(cases, desc="decode benchmark"):
        prompts = book_prompts(m.tokenizer, batch, ctx, args.text)
        row = {"context": ctx, "batch": batch}
        row["torch_tok_s"] = (
            float("nan") if args.no_torch else torch_in_subprocess(args, ctx, batch)
        )
        for name in args.policies:
            policy = parse_policy(
                name, m.cfg.num_layers, ctx + args.new_tokens, args.budget, args.calibrated
            )
            tok_s, kv = time_ours(m, prompts, args.new_tokens, policy, gates)
            row[f"{name}_tok_s"], row[f"{name}_kv_bytes"] = tok_s, kv
        rows.append(row)
        tqdm.write(dumps(row))
    return rows


def _table_head(policies: list[str]) -> list[str]:
    """Column names: PyTorch's rate, then per policy its rate, ratios and KV size."""
    base = policies[0]
    head = ["context", "batch", "torch tok/s"]
    for name in policies:
        head += [f"{name} tok/s", f"{name} / torch", f"{name} KV MiB"]
        if name != base:
            head += [f"{name} / {base} speed", f"{name} / {base} KV"]
    return head


def _table_cells(r: dict, policies: list[str]) -> list[str]:
    """The cells of one measured row, in `_table_head`'s order."""
    base = policies[0]
    cells = [str(r["context"]), str(r["batch"]), f"{r['torch_tok_s']:.1f}"]
    for name in policies:
        cells += [
            f"{r[f'{name}_tok_s']:.1f}",
            f"{r[f'{name}_tok_s'] / r['torch_tok_s']:.2f}x",
            f"{r[f'{name}_kv_bytes'] / 2**20:.1f}",
        ]
        if name != base:
            cells += [
                f"{r[f'{name}_tok_s'] / r[f'{base}_tok_s']:.2f}x",
                f"{r[f'{name}_kv_bytes'] / r[f'{base}_kv_bytes']:.3f}",
            ]
    return cells


def _table(rows: list[dict], args: argparse.Namespace, source: str, gates_src: str) -> str:
    """The Markdown report: a header line, then one table row per measured row."""
    head = _table_head(args.policies)
    lines = [
        f"model: {source}; new tokens: {args.new_tokens}; float32; CPU "
        f"({jax.devices()[0].device_kind}); budget {args.budget}; gates: {gates_src}",
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
    m = load_model(args.model)
    gates, gates_src = _gates(m, args.gates)
    rows = _measure(m, args, gates)
    table = _table(rows, args, m.source, gates_src)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out.with_suffix(".md"), table + "\n")
    write_json(out.with_suffix(".json"), rows, indent=2)


if __name__ == "__main__":
    main()

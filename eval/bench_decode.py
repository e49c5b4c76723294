"""Decode speed: our jitted generate vs transformers' PyTorch generate, full cache, same CPU.

    python -m eval.bench_decode [--contexts 1024 4096] [--batches 1 8] [--new-tokens 128]

Prompts are real text (the shared books), one offset per batch row. For both systems the
decode rate is new tokens (batch x (new_tokens - 1)) over decode time: ours times its decode
loop directly; for PyTorch, decode time = time(generate N tokens) - time(generate 1 token).
Both run after a warm-up with the same shapes, so compilation is excluded.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tqdm import tqdm

from smartkv_jax.convert import DEFAULT_MODEL, load_model, smollm2_path
from smartkv_jax.data import read_text, text_files
from smartkv_jax.generate import generate


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


def time_ours(m, prompts, new_tokens: int) -> float:
    generate(m.params, m.cfg, prompts, 2, stop_tokens=())
    res = generate(m.params, m.cfg, prompts, new_tokens, stop_tokens=())
    return res.decode_tokens_per_s


def time_torch(hf, prompts, new_tokens: int) -> float:
    import torch

    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)

    def run(n: int) -> float:
        t = time.perf_counter()
        with torch.no_grad():
            hf.generate(
                ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False
            )
        return time.perf_counter() - t

    run(2)
    decode_s = run(new_tokens) - run(1)
    return len(prompts) * (new_tokens - 1) / decode_s


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--text", default=None, help="directory of .txt files (default: shared books)")
    ap.add_argument("--no-torch", action="store_true", help="time only our implementation")
    ap.add_argument("--out", default="results/bench_decode")
    args = ap.parse_args(argv)

    m = load_model(args.model)
    hf = None
    if not args.no_torch:
        import torch
        from transformers import AutoModelForCausalLM

        p = smollm2_path() if args.model == DEFAULT_MODEL else Path(args.model)
        kw = {"gguf_file": p.name} if p.suffix == ".gguf" else {}
        hf = AutoModelForCausalLM.from_pretrained(
            str(p.parent if p.suffix == ".gguf" else p), dtype=torch.float32, **kw
        ).eval()
    rows = []
    cases = [(c, b) for c in args.contexts for b in args.batches]
    for ctx, batch in tqdm(cases, desc="decode benchmark"):
        prompts = book_prompts(m.tokenizer, batch, ctx, args.text)
        ours = time_ours(m, prompts, args.new_tokens)
        theirs = time_torch(hf, prompts, args.new_tokens) if hf is not None else float("nan")
        rows.append(
            {
                "context": ctx,
                "batch": batch,
                "ours_tok_s": ours,
                "torch_tok_s": theirs,
                "ratio": ours / theirs,
            }
        )
        tqdm.write(json.dumps(rows[-1]))
    lines = [
        f"model: {m.source}; new tokens: {args.new_tokens}; float32; full cache; CPU",
        "",
        "| context | batch | ours tok/s | torch tok/s | ours / torch |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['context']} | {r['batch']} | {r['ours_tok_s']:.1f} | "
            f"{r['torch_tok_s']:.1f} | {r['ratio']:.2f}x |"
        )
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(table + "\n")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

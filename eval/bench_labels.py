"""Label extraction: throughput and peak memory, blockwise lifespans vs the dense T x T path.

    python -m eval.bench_labels [--windows 2048 8192] [--methods blockwise dense]

Each (window, method) runs in a fresh subprocess that loads the model, labels one window
of a shared book at tau 0.05 twice (the first run compiles) and reports the second run's
tokens/s and the process's peak resident memory (ru_maxrss). A baseline subprocess that
only loads the model gives the memory the labelling adds.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

from smartkv_jax.jsonio import dumps, write_table_and_rows


def child(window: int, method: str) -> dict:
    from smartkv_jax.convert import load_model
    from smartkv_jax.data import read_text, text_files
    from train.labels import window_labels

    m = load_model("smollm2")
    ids = m.tokenizer(read_text(text_files()[1])).input_ids[:window]
    if len(ids) < window:
        raise ValueError(f"the book has only {len(ids)} tokens")
    seconds = float("nan")
    if method != "none":
        for _ in range(2):
            t = time.perf_counter()
            window_labels(m.model, ids, taus=(0.05,), cap=window // 2, method=method)
            seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "window": window,
        "method": method,
        "seconds": seconds,
        "tokens_per_s": window / seconds,
        "peak_rss_bytes": peak,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--windows", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--methods", nargs="+", default=["blockwise", "dense"])
    ap.add_argument("--child", nargs=2, metavar=("WINDOW", "METHOD"), help=argparse.SUPPRESS)
    ap.add_argument("--out", default="results/bench_labels")
    args = ap.parse_args(argv)
    if args.child:
        print(dumps(child(int(args.child[0]), args.child[1])))
        return
    rows = []
    for window in args.windows:
        for method in ["none", *args.methods]:
            cmd = [sys.executable, "-m", "eval.bench_labels", "--child", str(window), method]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                rows.append({"window": window, "method": method, "error": out.stderr[-400:]})
            else:
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(dumps(rows[-1]), flush=True)
    lines = [
        "| window T | method | tokens/s | peak RSS GiB | over model-only GiB |",
        "|---:|---|---:|---:|---:|",
    ]
    base = {r["window"]: r.get("peak_rss_bytes", 0) for r in rows if r["method"] == "none"}
    for r in rows:
        if r["method"] == "none":
            continue
        if "error" in r:
            lines.append(f"| {r['window']} | {r['method']} | failed | - | - |")
            continue
        gib = r["peak_rss_bytes"] / 2**30
        lines.append(
            f"| {r['window']} | {r['method']} | {r['tokens_per_s']:.0f} | {gib:.2f} | "
            f"{(r['peak_rss_bytes'] - base[r['window']]) / 2**30:.2f} |"
        )
    table = "\n".join(lines)
    print(table)
    write_table_and_rows(args.out, table, rows)


if __name__ == "__main__":
    main()

"""Per-head analysis of trained gates on held-out labels (docs/design.md: R², needle score).

    smartkv analyze --labels labels/test --gates ckpt_tau005 ckpt_tau011 --out results/analysis

For each gate checkpoint (its tau is read from the checkpoint): R² per (layer, KV head) on
the uncensored held-out keys, with and without the first 4 positions (attention sinks), and
the mean label and mean prediction per layer. With two taus, the threshold comparison. With
the model available, the per-layer needle score: the mean gate prediction (log4) over the
needle's tokens in a needle-in-a-haystack prompt (full cache). Writes analysis.json,
analysis.md, r2_heatmap.png and lifespans.png.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from smartkv_jax import gates as gate_mod
from smartkv_jax.gate_checkpoint import load_gates
from smartkv_jax.jsonio import dumps, write_json, write_text_atomic
from train.label_store import label_of, open_store
from train.metrics import r2_per_head

SINKS = 4


def per_layer_means(gates, store, tau: float, batch: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Mean label [L] and mean prediction [L] over the uncensored keys (all heads)."""
    import jax

    rows = np.flatnonzero(~store.censored_N)
    ti = store.tau_index(tau)
    apply = jax.jit(gate_mod.apply_all)
    label_sum = np.zeros(store.shape[0])
    pred_sum = np.zeros(store.shape[0])
    for s in range(0, len(rows), batch):
        r = rows[s : s + batch]
        label_sum += label_of(store.lifespan_NTLK[r, ti]).sum(axis=(0, 2))
        pred_sum += np.asarray(apply(gates, store.keys_NLKD[r], store.pos_N[r])).sum(axis=(0, 2))
    n = len(rows) * store.shape[1]
    return label_sum / n, pred_sum / n


def needle_scores(model_name: str, gates, context: int, depth: float) -> list[float]:
    """Per-layer needle score (mean over KV heads) with the full cache."""
    from eval.needle import build_prompts, evaluate_needle
    from smartkv_jax.convert import load_model
    from smartkv_jax.policy_table import make_policy

    m = load_model(model_name)
    prompts = build_prompts(m.tokenizer, [context], [depth])
    res = evaluate_needle(
        m.model,
        m.tokenizer,
        lambda n: make_policy("full", m.cfg.num_layers, n),
        prompts,
        probe_gates=gates,
        progress=False,
    )
    return [float(np.mean(row)) for row in res.layer_needle_score]


def analyze(
    labels: str | Path,
    gate_ckpts: list[str],
    out_dir: str | Path,
    *,
    model: str | None = None,
    needle_context: int = 1024,
    needle_depth: float = 0.5,
) -> dict[str, Any]:
    """Run the analysis; returns the JSON-ready result (also written to out_dir)."""
    store = open_store(labels)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    per_tau: dict[str, Any] = {}
    loaded = {}
    for ckpt in gate_ckpts:
        gates, meta = load_gates(ckpt)
        tau = float(meta["tau"])
        loaded[tau] = gates
        r2 = r2_per_head(gates, store, tau)
        r2_ns = r2_per_head(gates, store, tau, exclude_first=SINKS)
        mean_label, mean_pred = per_layer_means(gates, store, tau)
        per_tau[f"{tau:g}"] = {
            "tau": tau,
            "gates": str(ckpt),
            "r2": r2.round(4).tolist(),
            "r2_no_sinks": r2_ns.round(4).tolist(),
            "median_r2": float(np.nanmedian(r2)),
            "median_r2_no_sinks": float(np.nanmedian(r2_ns)),
            "layer0_r2": r2[0].round(4).tolist(),
            "mean_label_per_layer": mean_label.round(4).tolist(),
            "mean_pred_per_layer": mean_pred.round(4).tolist(),
        }
    if not per_tau:
        raise ValueError("give at least one gate checkpoint")
    main_tau = min(loaded)
    result: dict[str, Any] = {
        "labels": str(labels),
        "sources": store.meta.get("sources"),
        "model": store.meta.get("model"),
        "layer_windows": list(store.layer_windows),
        **{k: per_tau[f"{main_tau:g}"][k] for k in ("tau", "r2", "median_r2", "layer0_r2")},
        "per_tau": per_tau,
    }
    if len(per_tau) > 1:
        hi = max(loaded)
        lo0 = np.array(per_tau[f"{main_tau:g}"]["layer0_r2"])
        hi0 = np.array(per_tau[f"{hi:g}"]["layer0_r2"])
        result["layer0_lower_tau_better"] = [bool(x) for x in lo0 > hi0]
    if model is not None:
        result["needle_score_per_layer"] = needle_scores(
            model, loaded[main_tau], needle_context, needle_depth
        )
        result["needle_prompt"] = {"context": needle_context, "depth": needle_depth}
    write_json(out / "analysis.json", result, indent=2)
    write_text_atomic(out / "analysis.md", markdown(result))
    plot(result, store, main_tau, out)
    return result


def markdown(result: dict[str, Any]) -> str:
    taus = sorted(result["per_tau"].values(), key=lambda d: d["tau"])
    lines = [
        f"label store: {result['labels']} (books: {', '.join(result['sources'] or [])}); "
        f"model: {result['model']}",
        "",
        "| tau | median R² (all heads) | without first 4 positions | layer-0 heads |",
        "|---:|---:|---:|---|",
    ]
    for d in taus:
        lines.append(
            f"| {d['tau']:g} | {d['median_r2']:.3f} | {d['median_r2_no_sinks']:.3f} | "
            f"{' / '.join(f'{x:.2f}' for x in d['layer0_r2'])} |"
        )
    windows = result.get("layer_windows") or []
    head = ["layer", "attention"] if windows else ["layer"]
    for d in taus:
        head += [
            f"R² heads (tau {d['tau']:g})",
            f"mean label {d['tau']:g}",
            f"mean pred {d['tau']:g}",
        ]
    if "needle_score_per_layer" in result:
        head.append("needle score")
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for layer in range(len(taus[0]["r2"])):
        cells = [str(layer)]
        if windows:
            cells.append(f"sliding {windows[layer]}" if windows[layer] else "global")
        for d in taus:
            cells += [
                " / ".join(f"{x:.2f}" for x in d["r2"][layer]),
                f"{d['mean_label_per_layer'][layer]:.2f}",
                f"{d['mean_pred_per_layer'][layer]:.2f}",
            ]
        if "needle_score_per_layer" in result:
            cells.append(f"{result['needle_score_per_layer'][layer]:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], store, tau: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    taus = sorted(result["per_tau"].values(), key=lambda d: d["tau"])
    fig, axes = plt.subplots(1, len(taus), figsize=(2.6 * len(taus) + 1, 7), squeeze=False)
    for ax, d in zip(axes[0], taus):
        im = ax.imshow(np.array(d["r2"], float), aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax.set_title(f"R², tau {d['tau']:g}\nmedian {d['median_r2']:.2f}")
        ax.set_xlabel("KV head")
    axes[0][0].set_ylabel("layer")
    fig.colorbar(im, ax=axes[0].tolist())
    fig.savefig(out / "r2_heatmap.png", dpi=120)
    plt.close(fig)

    rows = np.flatnonzero(~store.censored_N)
    y = label_of(store.lifespan_NTLK[rows, store.tau_index(tau)])  # [N, L, K]
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.violinplot([y[:, layer].ravel() for layer in range(y.shape[1])], showmedians=True)
    ax.set_xlabel("layer (1-based)")
    ax.set_ylabel("log4(1 + lifespan)")
    ax.set_title(f"lifespan distribution per layer (uncensored held-out keys, tau {tau:g})")
    fig.savefig(out / "lifespans.png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "analyze",
        help="per-head R², lifespan statistics and needle scores of trained gates",
        description=__doc__.split("\n\n", 2)[2],
    )
    p.add_argument("--labels", required=True, help="held-out label store (smartkv labels)")
    p.add_argument(
        "--gates",
        nargs="+",
        required=True,
        help="gate checkpoint directories, e.g. one trained at tau 0.05 and one at 0.11",
    )
    p.add_argument("--out", default="results/analysis", help="output directory")
    p.add_argument(
        "--model",
        default="smollm2",
        help="model for the needle score (the labels' model); 'none' to skip",
    )
    p.add_argument("--needle-context", type=int, default=1024, help="needle prompt length")
    p.add_argument("--needle-depth", type=float, default=0.5, help="needle depth (0..1)")
    p.add_argument(
        "--json",
        action="store_true",
        help="print JSON (keys: r2, median_r2, layer0_r2, tau, per_tau, ...)",
    )
    p.set_defaults(func=_cmd)


def _cmd(args) -> int:
    res = analyze(
        args.labels,
        args.gates,
        args.out,
        model=None if args.model == "none" else args.model,
        needle_context=args.needle_context,
        needle_depth=args.needle_depth,
    )
    print(dumps(res, indent=2) if args.json else markdown(res))
    return 0

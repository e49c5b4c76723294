"""`smartkv train-gates`: train the lifespan gates on label stores and report held-out R².

    smartkv train-gates --train labels/train --eval labels/test --tau 0.05 --ckpt-dir ckpt/gates

The flags that set a field of `TrainConfig` (train/train_gates.py) or `GateConfig`
(smartkv_jax/gates.py) take their type and default from it. See docs/design.md (gate
training).
"""

from __future__ import annotations

import argparse
from typing import Any

import jax

from smartkv_cli.flags import add_field
from smartkv_cli.processes import add_process_flags, start_processes
from smartkv_jax import sharding as shd
from smartkv_jax.gates import PAIRINGS, GateConfig
from smartkv_jax.jsonio import dumps, write_json
from train.label_store import open_store
from train.metrics import LOSSES
from train.train_gates import TrainConfig, train_gates

# TrainConfig fields with a flag (--name-with-dashes unless renamed in FLAGS), in help order
TRAIN_HELP = {
    "tau": "attention threshold of the labels to fit",
    "steps": "optimiser steps",
    "batch_size": "keys per step (global)",
    "lr": "peak learning rate (AdamW)",
    "weight_decay": "AdamW weight decay",
    "warmup": "linear warmup steps before cosine decay",
    "loss": "mse, huber, or censored (uses right-censored keys as lower bounds)",
    "huber_delta": "huber delta in label stds",
    "exclude_sinks": "leave the first N positions of every window out of training",
    "seed": "seed of init and sampling",
    "data_shards": "sampling shards; the process count must divide it",
    "eval_every": "steps between R² evaluations",
    "eval_max_rows": "held-out keys used by the periodic evaluation (0: all)",
    "ckpt_every": "steps between checkpoints",
    "keep_checkpoints": "checkpoints to keep (0: all)",
}
# GateConfig fields with a flag; a field that defaults to True is turned off by --no-<name>
GATE_HELP = {
    "hidden": "hidden width of each gate (0: linear gate)",
    "activation": "hidden activation: gelu, relu, tanh or silu",
    "pair_norms": "also feed the log length of every RoPE coordinate pair "
    "(half: rotate-half pairs)",
    "key_norm": "do not feed log ||key|| to the gates",
    "position": "do not feed the position to the gates",
    "pos_clip": "positions beyond this read as this",
}
FLAGS = {"keep_checkpoints": "--keep"}
CHOICES = {"loss": LOSSES, "pair_norms": PAIRINGS}


def _add_fields(p: argparse.ArgumentParser, cls: type, helps: dict[str, str]) -> None:
    """One flag per entry of `helps`, with the type and default of that field of `cls`."""
    for name, text in helps.items():
        if getattr(cls, name, None) is True:
            add_field(p, "--no-" + name.replace("_", "-"), cls, name, help=text)
            continue
        flag = FLAGS.get(name, "--" + name.replace("_", "-"))
        kw: dict[str, Any] = {"dest": name, "help": text, "choices": CHOICES.get(name)}
        if name not in CHOICES:
            kw["metavar"] = flag[2:].replace("-", "_").upper()
        add_field(p, flag, cls, name, **kw)


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Register the `train-gates` command on an argparse subparsers object."""
    p = subparsers.add_parser(
        "train-gates",
        help="train lifespan gates on a label store and report held-out R²",
        description="Train one small MLP gate per (layer, KV head) to predict log4(1 + "
        "lifespan) from the pre-RoPE key, with sharded jit steps and orbax checkpoints "
        "(a rerun with the same --ckpt-dir resumes).",
    )
    a = p.add_argument
    a(
        "--train",
        required=True,
        nargs="+",
        help="label store(s) to train on (directories with metadata.json; several are joined)",
    )
    a("--eval", default=None, help="held-out label store for R² (optional)")
    _add_fields(p, TrainConfig, TRAIN_HELP)
    _add_fields(p, GateConfig, GATE_HELP)
    a("--ckpt-dir", default=None, help="orbax checkpoint directory (resumes if it has one)")
    a(
        "--stop-after",
        type=int,
        default=None,
        help="stop and checkpoint at this step (as if killed); rerun to resume",
    )
    a("--mesh-data", type=int, default=None, help="size of the mesh's data axis")
    a("--mesh-model", type=int, default=None, help="size of the mesh's model (heads) axis")
    add_process_flags(p)
    a("--no-progress", action="store_true", help="no progress bar")
    a("--json", action="store_true", help="print the summary as one JSON object")
    a("--out", default=None, help="also write the summary JSON to this file")
    p.set_defaults(func=cmd_train_gates)
    return p


def cmd_train_gates(args: argparse.Namespace) -> int:
    """Run `train-gates` from parsed arguments."""
    start_processes(args)
    cfg = TrainConfig(**{name: getattr(args, name) for name in TRAIN_HELP})
    store = open_store(args.train)
    nl, nk, d = store.shape
    gate = GateConfig(nl, nk, d, **{name: getattr(args, name) for name in GATE_HELP})
    mesh = shd.make_mesh(args.mesh_data, args.mesh_model, num_heads=nl * nk)
    _, hist = train_gates(
        store,
        args.eval,
        cfg,
        args.ckpt_dir,
        mesh,
        gate=gate,
        stop_after=args.stop_after,
        progress=not args.no_progress,
    )
    if jax.process_index() != 0:
        return 0
    report = {
        "model": store.meta["model"],
        "train_config": cfg.to_dict(),
        "gate_config": gate.to_dict(),
        "mesh": dict(zip(shd.AXES, shd.mesh_shape(mesh))),
        "processes": jax.process_count(),
        "ckpt_dir": args.ckpt_dir,
        "resumed_from": hist["resumed_from"],
        "final_loss": hist["loss"][-1][1] if hist["loss"] else None,
        "eval": hist["eval"],
        "summary": hist["summary"],
        "seconds": round(hist["seconds"], 2),
    }
    if args.out:  # checked before training (smartkv_cli/validate.py OUTPUT_FILES)
        write_json(args.out, report, indent=2)
    if args.json:
        print(dumps(report, indent=2))
    else:
        _print_table(report)
    return 0


def _print_table(report: dict) -> None:
    print(f"model {report['model']}  mesh {report['mesh']}  processes {report['processes']}")
    print(f"train config {report['train_config']}")
    print(f"gate config  {report['gate_config']}")
    s = report["summary"]
    if s is None:
        print(f"final loss {report['final_loss']}  (no held-out summary)")
        return
    print(f"tau {s['tau']}: {s['eval_keys']} held-out keys, {s['steps']} steps")
    print(f"{'layer':>5} {'median R2':>10} {'(no sinks)':>10}")
    for i, (a, b) in enumerate(zip(s["per_layer_median_r2"], s["nosink"]["per_layer_median_r2"])):
        print(f"{i:>5} {a:>10.3f} {b:>10.3f}")
    print(f"layer-0 heads R2: {s['layer0_r2']}  (no sinks: {s['nosink']['layer0_r2']})")
    print(
        f"median R2 over all heads: {s['median_r2']:.4f}  "
        f"(no sinks: {s['nosink']['median_r2']:.4f})"
    )

"""The multi-process flags of `smartkv train-gates` and `smartkv labels`, and starting
jax.distributed from them (train/distributed.py; docs/design.md: sharding and scale)."""

from __future__ import annotations

import argparse

from train.distributed import init_distributed


def add_process_flags(p: argparse.ArgumentParser) -> None:
    """--coordinator, --num-processes, --process-id and --distributed."""
    p.add_argument(
        "--coordinator", default=None, help="host:port of process 0 for multi-process runs"
    )
    p.add_argument(
        "--num-processes", type=int, default=None, help="number of processes (multi-host)"
    )
    p.add_argument("--process-id", type=int, default=None, help="this process's index (multi-host)")
    p.add_argument(
        "--distributed",
        choices=["off", "auto"],
        default="off",
        help="auto: jax.distributed.initialize() from the cluster environment",
    )


def start_processes(args: argparse.Namespace) -> None:
    """Start jax.distributed if the flags ask for several processes; before any other JAX call."""
    init_distributed(
        args.coordinator, args.num_processes, args.process_id, auto=args.distributed == "auto"
    )

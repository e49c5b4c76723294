"""Multi-host helpers for gate training and labelling (docs/design.md: sharding and scale).

Launch one process per host with --num-processes/--process-id/--coordinator (or
--distributed auto on a managed cluster); `init_distributed` must run before any other JAX
call. On CPU the collectives go through gloo.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import numpy as np

from smartkv_jax.errors import SmartKVError


def init_distributed(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto: bool = False,
    cpu_collectives: str = "gloo",
) -> bool:
    """Start jax.distributed when several processes are asked for (or `auto`, for clusters
    JAX can read the topology of). Call before any other JAX use. Returns True if started."""
    if not auto and (num_processes is None or num_processes <= 1):
        return False
    if not auto and (coordinator is None or process_id is None):
        raise ValueError("multi-process runs need --coordinator and --process-id")
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    if auto:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=num_processes,
            process_id=process_id,
        )
    return True


def to_host(x) -> np.ndarray:
    """Host copy of a (fully replicated or fully addressable) jax.Array."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def allgather_f64(x_SV: np.ndarray) -> np.ndarray:
    """[P, S, V] float64 from every process's [S, V] (exact: travels as uint32 pairs)."""
    if jax.process_count() == 1:
        return x_SV[None]
    from jax.experimental import multihost_utils

    u = np.ascontiguousarray(x_SV).view(np.uint32)
    g = np.asarray(multihost_utils.process_allgather(u))
    return np.ascontiguousarray(g).view(np.float64)


def on_every_process(
    what: str, work: Callable[[], Sequence[float] | None], width: int = 0
) -> np.ndarray:
    """Run `work` here and gather what it returned on every process (`width` numbers, or None for
    zeros): [P, width] float64, exact. Also a barrier. If `work` raised on any process, every
    process raises (the failed ones their own error, the others a SmartKVError naming them), so
    no process is left waiting at a later collective for one that has stopped."""
    row_W = np.zeros(width + 1)  # [0]: 1 where work finished, then its numbers
    error = None
    try:
        out = work()
        row_W[1:] = 0.0 if out is None else np.asarray(out, np.float64)
        row_W[0] = 1.0
    except Exception as err:  # re-raised below, once every process knows
        error = err
    rows_PW = allgather_f64(row_W[None])[:, 0]
    if error is not None:
        raise error
    failed = np.flatnonzero(rows_PW[:, 0] == 0).tolist()
    if failed:
        raise SmartKVError(f"{what} failed on process {failed} (its output says why)")
    return rows_PW[:, 1:]

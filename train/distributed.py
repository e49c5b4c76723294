"""Multi-host helpers for gate training (docs/design.md: sharding and scale).

Launch one process per host with --num-processes/--process-id/--coordinator (or
--distributed auto on a managed cluster); `init_distributed` must run before any other JAX
call. On CPU the collectives go through gloo.
"""

from __future__ import annotations

import jax
import numpy as np


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
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    if auto:
        jax.distributed.initialize()
    else:
        if coordinator is None or process_id is None:
            raise ValueError("multi-process runs need --coordinator and --process-id")
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

"""Which implementation of the cache kernels runs: the Pallas TPU kernels or their plain
jax.numpy references (docs/design.md: kernels).

The choice is one explicit setting, `KERNEL_MODES`: "auto" (Pallas on a TPU backend, the
reference elsewhere), "pallas", "interpret" (the Pallas kernels in interpret mode, for tests
of the kernel path on a CPU) or "reference". A cache records the resolved choice as static
metadata (`KVCache.kernels`), so jitted steps compile once per choice and a test can force
either path by building its cache with it.
"""

from __future__ import annotations

import jax

KERNEL_MODES = ("auto", "pallas", "interpret", "reference")
PALLAS_BLOCK_SLOTS = 128  # slots per block of the decode-attention kernel on TPU


def resolve_kernels(mode: str = "auto") -> str:
    """ "pallas" or "reference" for a mode of KERNEL_MODES."""
    if mode not in KERNEL_MODES:
        raise ValueError(f"unknown kernel mode {mode!r}; known: {', '.join(KERNEL_MODES)}")
    if mode == "auto":
        return "pallas" if jax.default_backend() == "tpu" else "reference"
    return mode


def slot_block(mode: str = "auto") -> int:
    """Cache capacities should be multiples of this so the kernel never pads a cache on every
    step: the kernel's block on a TPU, 1 (no constraint) for the reference and interpret."""
    return PALLAS_BLOCK_SLOTS if resolve_kernels(mode) == "pallas" else 1

"""Eviction policies: per-layer ranking rules over the cache pytree.

A policy decides, for every (batch, KV head), which slots survive when a new token needs a
slot. It does so with three pure functions of fixed shapes:

- `new_scores`: the score stored with each incoming token (what the policy ranks by later).
- `ranks`: a float rank per slot at time t; the lowest-ranked slot is the victim. Empty slots
  rank -inf, protected slots (sinks, recent window) +inf.
- `visible_pos`: the slot positions as attention should see them (-1 hides a slot).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

import jax.numpy as jnp

POLICY_KINDS = ("full",)


@dataclasses.dataclass(frozen=True)
class LayerPolicy:
    """How one layer's cache is managed. `capacity` is slots per (batch, KV head);
    None means "as long as the whole sequence" (the full cache)."""

    kind: str = "full"
    capacity: int | None = None
    n_sink: int = 4
    window: int = 32

    def __post_init__(self) -> None:
        if self.kind not in POLICY_KINDS:
            raise ValueError(f"unknown policy {self.kind!r}; known: {', '.join(POLICY_KINDS)}")
        if self.capacity is not None and self.capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {self.capacity}")


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    """Per-layer policy table: `layers[i]` manages layer i."""

    layers: tuple[LayerPolicy, ...]

    @classmethod
    def uniform(cls, num_layers: int, policy: LayerPolicy | None = None) -> PolicyConfig:
        return cls(layers=(policy or LayerPolicy(),) * num_layers)

    def resolve(self, max_len: int) -> PolicyConfig:
        """Fill capacity=None with `max_len` and cap every capacity at `max_len`."""
        return PolicyConfig(
            tuple(
                dataclasses.replace(p, capacity=min(p.capacity or max_len, max_len))
                for p in self.layers
            )
        )

    def groups(self) -> list[tuple[int, int, LayerPolicy]]:
        """Maximal runs of consecutive layers with the same policy: (start, end, policy)."""
        out: list[tuple[int, int, LayerPolicy]] = []
        for i, p in enumerate(self.layers):
            if out and out[-1][2] == p:
                out[-1] = (out[-1][0], i + 1, p)
            else:
                out.append((i, i + 1, p))
        return out

    def to_json(self) -> str:
        return json.dumps([dataclasses.asdict(p) for p in self.layers])


def new_scores(policy: LayerPolicy, pos_BC: jnp.ndarray, num_kv_heads: int) -> jnp.ndarray:
    """Score stored with each new token, [B, K, C] float32."""
    del policy
    return jnp.broadcast_to(
        pos_BC[:, None, :], (pos_BC.shape[0], num_kv_heads, pos_BC.shape[1])
    ).astype(jnp.float32)


def ranks(
    policy: LayerPolicy, pos_BKS: jnp.ndarray, score_BKS: jnp.ndarray, t_B: jnp.ndarray
) -> jnp.ndarray:
    """Rank of each slot at time t_B (the newest position), [B, K, S] float32."""
    del policy, t_B
    return jnp.where(pos_BKS >= 0, score_BKS, -jnp.inf)


def visible_pos(
    policy: LayerPolicy, pos_BKS: jnp.ndarray, score_BKS: jnp.ndarray, t_B: jnp.ndarray
) -> jnp.ndarray:
    """Slot positions as attention sees them at time t_B; -1 hides a slot."""
    del policy, score_BKS, t_B
    return pos_BKS


def layer_capacities(config: PolicyConfig) -> Sequence[int]:
    return [p.capacity for p in config.layers]

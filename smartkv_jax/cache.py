"""The fixed-shape KV cache pytree and its pure operations: init, slot choice, row writes
(docs/design.md: the cache). Attention over it is in attention.py.

Layers that share a policy (and so a capacity) form a group; a group's arrays are stacked
on a leading layer axis so the model can run the group under one `lax.scan`. Per layer:

- k, v:  [B, K, S, D]  keys after RoPE and values, in the model's dtype
- pos:   [B, K, S]     int32 token position held by each slot, -1 if empty
- score: [B, K, S]     float32, what the layer's policy ranks by

S (the capacity) differs per group, so memory saved by a smaller budget is real.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from .config import ModelConfig
from .eviction import reference_evict_slots, sorted_evict_slots
from .kernels import resolve_kernels
from .sharding import cache_sharding

if TYPE_CHECKING:  # the table imports the policies, which read caches: no runtime import
    from jax.sharding import Mesh

    from .policy_table import PolicyConfig


@partial(jax.tree_util.register_dataclass, data_fields=["k", "v", "pos", "score"], meta_fields=[])
@dataclasses.dataclass
class LayerCache:
    k: jax.Array  # [(L,) B, K, S, D]
    v: jax.Array  # [(L,) B, K, S, D]
    pos: jax.Array  # [(L,) B, K, S] int32, -1 = empty
    score: jax.Array  # [(L,) B, K, S] float32

    @property
    def capacity(self) -> int:
        return self.pos.shape[-1]


@partial(
    jax.tree_util.register_dataclass,
    data_fields=["groups"],
    meta_fields=["bounds", "kernels", "mesh"],
)
@dataclasses.dataclass
class KVCache:
    """All layers' caches: `groups[g]` stacks layers bounds[g][0] .. bounds[g][1]-1.

    kernels: "pallas", "interpret" or "reference", how attention over this cache runs
    (static: a jitted step compiles once per choice; see kernels.py). mesh: the mesh the
    cache lies on (None: one device); a Pallas kernel runs on each device's shard of it.
    """

    groups: tuple[LayerCache, ...]
    bounds: tuple[tuple[int, int], ...]
    kernels: str = "reference"
    mesh: Mesh | None = None

    def nbytes(self) -> int:
        """Total bytes of every cache array (k, v, pos and score)."""
        return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(self.groups))

    def kv_bytes(self) -> int:
        """Bytes of the keys and values alone (the figure memory fractions compare)."""
        return sum(g.k.nbytes + g.v.nbytes for g in self.groups)

    def layer_capacities(self) -> list[int]:
        return [g.capacity for (a, b), g in zip(self.bounds, self.groups) for _ in range(a, b)]


def init_cache(
    cfg: ModelConfig,
    policy: PolicyConfig,
    batch: int,
    dtype: jnp.dtype = jnp.float32,
    kernels: str = "auto",
    mesh: Mesh | None = None,
) -> KVCache:
    """An empty cache; `policy` must be resolved for the model (every capacity and window
    set: `PolicyConfig.resolve(max_len, cfg.layer_windows)`). kernels: a mode of
    kernels.KERNEL_MODES ("auto": Pallas on TPU, the jnp reference elsewhere). mesh: made
    directly on it by `sharding.cache_sharding` (the model's: `sharding.model_mesh`)."""
    if len(policy.layers) != cfg.num_layers:
        raise ValueError(f"policy has {len(policy.layers)} layers, model has {cfg.num_layers}")
    policy.check_windows(cfg.layer_windows)

    def full(shape, fill, dt) -> jax.Array:
        where = None if mesh is None else cache_sharding(mesh, shape)
        return jnp.full(shape, fill, dt, device=where)

    groups, bounds = [], []
    for start, end, p in policy.groups():
        if p.capacity is None:
            raise ValueError("policy capacities are unresolved; call PolicyConfig.resolve first")
        n, shape = end - start, (batch, cfg.num_kv_heads, p.capacity)
        groups.append(
            LayerCache(
                k=full((n, *shape, cfg.head_dim), 0, dtype),
                v=full((n, *shape, cfg.head_dim), 0, dtype),
                pos=full((n, *shape), -1, jnp.int32),
                score=full((n, *shape), 0, jnp.float32),
            )
        )
        bounds.append((start, end))
    return KVCache(tuple(groups), tuple(bounds), resolve_kernels(kernels), mesh)


def choose_slots(
    cache: LayerCache,
    score_BKS: jax.Array,
    rank_BKS: jax.Array,
    pos_BC: jax.Array,
    new_score_BKC: jax.Array,
    new_rank_BKC: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Where a chunk's tokens go: each new token replaces the lowest-ranked slot when it
    ranks higher (empty slots rank -inf); padding tokens (pos -1) are skipped.

    `score_BKS` is the layer's (possibly refreshed) slot scores. Returns the layer's new
    pos_BKS and score_BKS and dest_BKC, the slot of each new token (S: not kept). The k/v rows
    are written afterwards by `write_rows`, for all layers of a group at once.
    """
    kh = new_score_BKC.shape[1]
    pos_BKC = jnp.broadcast_to(pos_BC[:, None, :], (pos_BC.shape[0], kh, pos_BC.shape[1]))
    # one token (decode): C argmins are cheapest; a prefill chunk: one sort of S + C ranks
    select = reference_evict_slots if pos_BC.shape[1] == 1 else sorted_evict_slots
    pos, score, _, dest_BKC = select(
        cache.pos, score_BKS, rank_BKS, pos_BKC, new_score_BKC, new_rank_BKC
    )
    return pos, score, dest_BKC


def write_rows(
    group: LayerCache,
    pos_LBKS: jax.Array,
    score_LBKS: jax.Array,
    dest_LBKC: jax.Array,
    k_LBKCD: jax.Array,
    v_LBKCD: jax.Array,
) -> LayerCache:
    """A stacked group with new k/v rows scattered to their slots (dest S = dropped).

    Only L*B*K*C rows are written; the rest of the buffers is untouched, so under jit with
    the cache donated (or carried by a loop) the update happens in place.
    """
    n, b, kh, _ = dest_LBKC.shape
    idx = (
        jnp.arange(n)[:, None, None, None],
        jnp.arange(b)[None, :, None, None],
        jnp.arange(kh)[None, None, :, None],
        dest_LBKC,
    )

    def write(buf, new):
        return buf.at[idx].set(new.astype(buf.dtype), mode="drop")

    return LayerCache(
        k=write(group.k, k_LBKCD), v=write(group.v, v_LBKCD), pos=pos_LBKS, score=score_LBKS
    )

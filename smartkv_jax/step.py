"""One jitted chunk step: a chunk of tokens through the model with the cache donated, used by
generation, perplexity, needle retrieval and labelling (docs/design.md: data flow).

Jitted functions take the model split into its static graph and its state (`split_model`),
so jit stays pure; the policy table, the graph and the probe are static, so a session
compiles one program per (policy, shapes, outputs asked for).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from .cache import KVCache
from .model import Probe, Transformer
from .policy_table import PolicyConfig


@partial(
    jax.tree_util.register_dataclass,
    data_fields=["cache", "logits", "nll", "probes"],
    meta_fields=[],
)
@dataclasses.dataclass
class StepOutput:
    """cache: the updated cache. logits: [B, V] float32 at column `select_B` of each row
    (None unless asked). nll: [B, C] float32 negative log-likelihood (nats) of `targets_BC`
    (None unless asked). probes: the probe's outputs stacked over layers (None without)."""

    cache: KVCache
    logits: jax.Array | None = None
    nll: jax.Array | None = None
    probes: Any = None


def split_model(model: Transformer, cache: KVCache) -> tuple[nnx.GraphDef, nnx.State]:
    """(graph, state) of `model` with its layers stacked per the cache's groups (in place,
    `Transformer.group_layers`): split once before a loop of `chunk_step` calls."""
    model.group_layers(cache.bounds)
    return nnx.split(model)


@partial(jax.jit, static_argnames=("graph", "policy", "probe"), donate_argnames=("cache",))
def chunk_step(
    graph: nnx.GraphDef,
    state: nnx.State,
    policy: PolicyConfig,
    tokens_BC: jax.Array,
    pos_BC: jax.Array,
    cache: KVCache,
    aux: dict[str, Any] | None = None,
    select_B: jax.Array | None = None,
    targets_BC: jax.Array | None = None,
    probe: Probe | None = None,
) -> StepOutput:
    """A chunk [B, C] (positions pos_BC, -1 = padding) through the model, updating `cache`
    (donated). Asks for: logits at column select_B [B] int32 of each row, the NLL of
    targets_BC [B, C] (the next token of each position), and/or the probe's outputs."""
    model = nnx.merge(graph, state)
    out = model(tokens_BC, pos_BC, cache, policy, aux, probe)
    logits_BV = nll_BC = None
    if select_B is not None:
        rows = jnp.arange(tokens_BC.shape[0])
        logits_BV = model.logits(out.hidden[rows, select_B])
    if targets_BC is not None:
        logits_BCV = model.logits(out.hidden)
        lse_BC = jax.nn.logsumexp(logits_BCV, axis=-1)
        tgt_BC = jnp.take_along_axis(logits_BCV, targets_BC[..., None], axis=-1)[..., 0]
        nll_BC = lse_BC - tgt_BC
    return StepOutput(out.cache, logits_BV, nll_BC, out.probes)

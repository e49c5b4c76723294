"""Sharded vs one-device inference on 8 forced CPU devices, for tests/test_sharded_inference.py.

XLA_FLAGS (the device count) must be set before jax starts, so the test runs this module in
a subprocess (`python -m tests.sharded_runs`); it prints one JSON object: per case the greedy
tokens of both runs, the largest float32 differences and the shardings that were used; and
the Pallas kernel path (interpret mode) on a mesh against the one-device reference.
"""

from __future__ import annotations

import functools
import json

import jax
import numpy as np

from eval.perplexity import streaming_nll
from smartkv_jax import attention
from smartkv_jax import sharding as shd
from smartkv_jax.cache import init_cache
from smartkv_jax.gates import GateConfig, init_gates
from smartkv_jax.generate import generate, prefill
from smartkv_jax.model import Transformer
from smartkv_jax.policy_table import PolicyConfig, make_policy
from smartkv_jax.sharding import on_each_shard

from .conftest import tiny_config

LAYERS, MAX_NEW, CHUNK = 3, 6, 16
# 8 prompts of 40..110 tokens: rows split over data sizes 1, 2 and 8, the hybrid evicts
PROMPTS = [[(7 * b + 3 * i) % 50 + 1 for i in range(40 + 10 * b)] for b in range(8)]
# name: (KV heads, query heads, policy, mesh data x model, decode too or prefill only);
# K=3 does not divide model=4, K=4 does not divide model=8
CASES = {
    "full_8x1_k4": (4, 8, "full", (8, 1), True),
    "hybrid_2x4_k4": (4, 8, "hybrid", (2, 4), True),
    "hybrid_2x4_k3": (3, 12, "hybrid", (2, 4), True),
    "hybrid_1x8_k4": (4, 8, "hybrid", (1, 8), False),
}


def _model(kv_heads: int, heads: int, mesh) -> Transformer:
    cfg = tiny_config(num_layers=LAYERS, num_heads=heads, num_kv_heads=kv_heads, max_position=256)
    model = Transformer.init_random(cfg, jax.random.PRNGKey(0))
    if mesh is not None:
        shd.shard_model(model, shd.make_mesh(*mesh))
    return model


def _gates(model: Transformer):
    cfg = model.cfg
    g = init_gates(GateConfig(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim), jax.random.key(1))
    g.w_out[...] = g.w_out[...] + 0.1  # predictions that differ between keys
    return g


def _run(model: Transformer, policy: PolicyConfig, decode: bool) -> dict:
    """The logits [B, V] after each prompt and the first group's cache after the prefill;
    with `decode`, the greedy tokens and that cache after them too."""
    gates = _gates(model) if policy.needs_gates else None
    resolved = policy.resolve(256, model.cfg.layer_windows)  # as generate resolves it
    mesh = shd.model_mesh(model)
    cache = init_cache(model.cfg, resolved, len(PROMPTS), model.dtype, mesh=mesh)
    logits, cache, _ = prefill(model, resolved, [PROMPTS], cache, CHUNK, {"gates": gates})
    out = {"logits": logits, "prefilled": cache.groups[0], "tokens": None, "decoded": None}
    if decode:
        res = generate(model, PROMPTS, MAX_NEW, policy=policy, gates=gates, chunk=CHUNK)
        out.update(tokens=res.tokens, decoded=res.cache.groups[0])
    return out


@functools.cache
def _reference(kv_heads: int, heads: int, policy_name: str) -> dict:
    """The one-device run (with decoding) that sharded cases compare against."""
    policy = make_policy(policy_name, LAYERS, 128, 0.5)
    return _run(_model(kv_heads, heads, None), policy, decode=True)


def _spec(x: jax.Array) -> list:
    """A sharding spec as JSON, padded with None to the array's rank."""
    spec = list(x.sharding.spec) + [None] * (x.ndim - len(x.sharding.spec))
    return [list(a) if isinstance(a, tuple) else a for a in spec]


def _max_diff(a: jax.Array, b: jax.Array) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def _cache_diffs(a, b) -> dict | None:
    """Largest |k| difference and whether every slot holds the same position."""
    if a is None:
        return None
    return {"k": _max_diff(a.k, b.k), "pos_equal": bool(np.array_equal(a.pos, b.pos))}


def compare_case(kv_heads: int, heads: int, policy_name: str, mesh, decode: bool) -> dict:
    ref = _reference(kv_heads, heads, policy_name)
    model = _model(kv_heads, heads, mesh)
    out = _run(model, make_policy(policy_name, LAYERS, 128, 0.5), decode)
    layer = model.stacks[0]
    regrouped = model.regroup(((0, 1), (1, LAYERS))).stacks[1]  # as a policy's groups split it
    return {
        "tokens": out["tokens"],
        "ref_tokens": ref["tokens"],
        "logits_diff": _max_diff(out["logits"], ref["logits"]),
        "prefilled": _cache_diffs(out["prefilled"], ref["prefilled"]),
        "decoded": _cache_diffs(out["decoded"], ref["decoded"]),
        "capacity": out["prefilled"].capacity,
        "specs": {
            "wq": _spec(layer.wq[...]),
            "wk": _spec(layer.wk[...]),
            "w_up": _spec(layer.w_up[...]),
            "wq_regrouped": _spec(regrouped.wq[...]),
            "cache_k": _spec(out["prefilled"].k),
            "logits": _spec(out["logits"]),
        },
        "devices": {
            "cache_k": len(out["prefilled"].k.sharding.device_set),
            "logits": len(out["logits"].sharding.device_set),
        },
    }


def compare_perplexity() -> dict:
    """Exact (chunk 1) streaming NLL of 4 rows of 64 tokens under the hybrid, mesh 2x4."""
    tokens = np.array([[(5 * b + 11 * i) % 50 + 1 for i in range(64)] for b in range(4)])
    policy = make_policy("hybrid", LAYERS, 64, 0.75)
    runs = []
    for mesh in (None, (2, 4)):
        model = _model(4, 8, mesh)
        nll, cache = streaming_nll(model, policy, tokens, gates=_gates(model), progress=False)
        runs.append((nll, cache.groups[0].k))
    (ref, _), (nll, k) = runs
    return {"nll_diff": float(np.max(np.abs(nll - ref))), "nll": float(nll.mean()), "k": _spec(k)}


def compare_kernel(mesh: tuple[int, int]) -> dict:
    """The hybrid's prefill with the Pallas decode-attention kernel (interpret mode) on a mesh
    against the one-device jnp reference; counts the shard_map wrappings of the kernel."""
    wrapped = []

    def counting(kernel, *args):
        wrapped.append(args)
        return on_each_shard(kernel, *args)

    attention.on_each_shard = counting
    try:
        model = _model(4, 8, mesh)
        resolved = make_policy("hybrid", LAYERS, 128, 0.5).resolve(256, model.cfg.layer_windows)
        gates = _gates(model)
        cache = init_cache(
            model.cfg, resolved, len(PROMPTS), kernels="interpret", mesh=shd.model_mesh(model)
        )
        logits, cache, _ = prefill(model, resolved, [PROMPTS], cache, CHUNK, {"gates": gates})
    finally:
        attention.on_each_shard = on_each_shard
    ref = _reference(4, 8, "hybrid")
    return {
        "logits_diff": _max_diff(logits, ref["logits"]),
        "prefilled": _cache_diffs(cache.groups[0], ref["prefilled"]),
        "wrapped": len(wrapped),
    }


def main() -> None:
    jax.config.update("jax_default_matmul_precision", "highest")
    out = {"devices": jax.device_count(), "default_mesh": shd.mesh_shape(shd.inference_mesh())}
    out["cases"] = {name: compare_case(*case) for name, case in CASES.items()}
    out["perplexity"] = compare_perplexity()
    out["kernel"] = {f"{d}x{m}": compare_kernel((d, m)) for d, m in ((2, 4), (1, 8))}
    print(json.dumps(out))


if __name__ == "__main__":
    main()

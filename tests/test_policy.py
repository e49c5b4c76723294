"""Eviction policies on the fixed-shape cache: exactness against dense references."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smartkv_jax import gates as gate_mod
from smartkv_jax.cache import init_cache
from smartkv_jax.generate import generate
from smartkv_jax.model import Transformer
from smartkv_jax.policy import POLICY_KINDS, policy_class
from smartkv_jax.policy_table import PolicyConfig
from smartkv_jax.step import split_model

from .conftest import chunk_logits, full_logits, tiny_config

CFG1 = tiny_config(num_layers=1, max_position=256)
CFG3 = dataclasses.replace(CFG1, num_layers=3)


def _params(cfg, seed=0):
    p = Transformer.init_random(cfg, jax.random.PRNGKey(seed))
    return jax.tree_util.tree_map(lambda a: a * 8 if a.ndim == 3 else a, p)


def layer(kind: str, **settings):
    """A layer policy of `kind` with those of `settings` its class has."""
    cls = policy_class(kind)
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in settings.items() if k in names})


def stream(model, policy, tokens, chunk, gates=None, oracle=None, on_chunk=None):
    """Logits [T, V] of one sequence fed `chunk` tokens at a time under `policy`
    (oracle: true scores [L, K, T])."""
    t = len(tokens)
    policy = policy.resolve(t)
    cache = init_cache(model.cfg, policy, 1)
    graph, state = split_model(model, cache)
    aux = {"gates": gates, "oracle": None if oracle is None else jnp.asarray(oracle[:, None])}
    out = []
    for s in range(0, t, chunk):
        toks = np.asarray(tokens[s : s + chunk], np.int32)[None]
        pos = np.arange(s, s + toks.shape[1], dtype=np.int32)[None]
        logits, cache = chunk_logits(graph, state, policy, toks, pos, cache, aux)
        out.append(np.asarray(logits)[0])
        if on_chunk is not None:
            on_chunk(s + toks.shape[1] - 1, cache)
    return np.concatenate(out), cache


def visible_reference(model, tokens, visible_sets):
    """One-layer model: query i's logits from a full forward over exactly its visible keys
    (one right-padded batch row per query, so a single compiled pass)."""
    rows = [np.array(sorted(vis | {i})) for i, vis in enumerate(visible_sets)]
    width = max(len(r) for r in rows)
    toks = np.zeros((len(rows), width), np.int32)
    pos = np.full((len(rows), width), -1, np.int32)
    for b, idx in enumerate(rows):
        toks[b, : len(idx)] = np.asarray(tokens)[idx]
        pos[b, : len(idx)] = idx
    pol = PolicyConfig.uniform(model.cfg.num_layers).resolve(width)
    cache = init_cache(model.cfg, pol, len(rows))
    logits, _ = chunk_logits(*split_model(model, cache), pol, toks, pos, cache)
    logits = np.asarray(logits)
    last = np.array([len(r) - 1 for r in rows])
    return logits[np.arange(len(rows)), last]


@pytest.mark.parametrize("chunk", [1, 3])
def test_window_equals_sliding_window_with_sinks(chunk):
    params = _params(CFG1)
    tokens = np.random.default_rng(0).integers(0, 53, 30)
    n_sink, cap = 2, 8
    policy = PolicyConfig.uniform(1, layer("window", capacity=cap, n_sink=n_sink))
    got, _ = stream(params, policy, tokens, chunk)
    sets = []
    for i in range(len(tokens)):
        s = i - i % chunk  # the chunk's first position: the cache holds what came before
        held = set(range(min(n_sink, s))) | set(range(max(n_sink, s - (cap - n_sink)), s))
        sets.append(held | set(range(s, i + 1)))
    np.testing.assert_allclose(got, visible_reference(params, tokens, sets), atol=1e-4)


def _infinite_gates(cfg):
    g = gate_mod.init_gates(
        gate_mod.GateConfig(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim), jax.random.PRNGKey(1)
    )
    g.w_out[...] = g.w_out[...] * 0
    g.b_out[...] = g.b_out[...] * 0 + 20.0
    return g


@pytest.mark.parametrize("kind", POLICY_KINDS)
def test_capacity_at_least_sequence_equals_full(kind):
    params = _params(CFG3)
    tokens = np.random.default_rng(1).integers(0, 53, 24)
    want = full_logits(params, tokens[None])[0]
    policy = PolicyConfig.uniform(3, layer(kind, capacity=24, recent=4, n_sink=1))
    oracle = np.zeros((3, 2, 24), np.float32)  # life 1: every key expires at once...
    gates = _infinite_gates(CFG3)
    if kind == "oracle":
        oracle += 20.0  # ...unless its predicted life is unbounded
    got, _ = stream(params, policy, tokens, 5, gates=gates, oracle=oracle)
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_expired_keys_are_hidden_from_attention():
    params = _params(CFG1)
    tokens = np.random.default_rng(2).integers(0, 53, 20)
    policy = PolicyConfig.uniform(
        1, layer("oracle", capacity=20, recent=3, n_sink=1, mask_expired=True)
    )
    oracle = np.zeros((1, 2, 20), np.float32)  # life 1 token for every key
    got, _ = stream(params, policy, tokens, 1, oracle=oracle)
    # key j stays visible to query i while j >= i - 2 (recent 3), j == 0 (sink) or i <= j + 1
    sets = [{0} | set(range(max(0, i - 2), i + 1)) | {i - 1} for i in range(20)]
    sets = [{j for j in s if j >= 0} for s in sets]
    np.testing.assert_allclose(got, visible_reference(params, tokens, sets), atol=1e-4)


def test_discounted_life_keeps_old_long_lived_keys_that_expiry_drops():
    pos = jnp.asarray([[[10, 500, 900]]])
    score = jnp.asarray([[[5.0, 2.0, 1.0]]])
    t = jnp.asarray([1000])
    expiry = layer("gated", margin=2.0).ranks(pos, score, t)
    np.testing.assert_allclose(expiry, [[[10 + 2 * 4.0**5, 500 + 2 * 16.0, 900 + 2 * 4.0]]])
    disc = layer("gated", discount=0.5).ranks(pos, score, t)
    want = np.asarray([5.0, 2.0, 1.0]) - 0.5 * np.log1p([990.0, 500.0, 100.0]) / np.log(4.0)
    np.testing.assert_allclose(disc[0, 0], want, rtol=1e-6)
    # at t = 3000 an old key predicted to outlive the label cap (log4 life 5) against a newer
    # short-lived one: expiry evicts the old key (its deadline 2058 has passed), the discount
    # keeps it
    pos, score, t = jnp.asarray([[[10, 2900]]]), jnp.asarray([[[5.0, 1.0]]]), jnp.asarray([3000])
    assert int(jnp.argmin(layer("gated", margin=2.0).ranks(pos, score, t))) == 0
    assert int(jnp.argmin(layer("gated", discount=0.5).ranks(pos, score, t))) == 1
    assert "discount 0.5" in layer("gated", discount=0.5).describe()
    with pytest.raises(ValueError, match="invalid policy settings"):
        layer("gated", discount=-1.0)


@pytest.mark.parametrize("kind", ["window", "gated", "oracle", "h2o", "snapkv", "knorm", "random"])
def test_sinks_and_recent_window_are_never_evicted(kind):
    params = _params(CFG3)
    tokens = np.random.default_rng(3).integers(0, 53, 40)
    n_sink, recent = 2, 5
    policy = PolicyConfig.uniform(
        3, layer(kind, capacity=10, n_sink=n_sink, recent=recent, mask_expired=False)
    )
    oracle = np.random.default_rng(4).uniform(-1, 3, (3, 2, 40)).astype(np.float32)
    gates = gate_mod.init_gates(gate_mod.GateConfig(3, 2, 8), jax.random.PRNGKey(2))

    def check(t, cache):
        pos = np.asarray(cache.groups[0].pos)  # [L, B, K, S]
        must = set(range(max(0, t - recent + 1), t + 1))
        if kind != "window":
            must |= set(range(min(n_sink, t + 1)))
        else:
            must = set(range(min(n_sink, t + 1))) | set(range(max(0, t - 7), t + 1))
        for row in pos.reshape(-1, pos.shape[-1]):
            assert must <= set(row.tolist()), (t, sorted(row.tolist()))

    stream(params, policy, tokens, 1, gates=gates, oracle=oracle, on_chunk=check)
    stream(params, policy, tokens, 4, gates=gates, oracle=oracle, on_chunk=check)


def _dense_probs(model, tokens):
    """Causal attention probabilities A[K, G, T, T] of a one-layer model."""
    cfg, t = model.cfg, len(tokens)
    pol = PolicyConfig.uniform(1).resolve(t)
    q, k, _ = model(
        jnp.asarray(tokens[None], jnp.int32),
        jnp.arange(t, dtype=jnp.int32)[None],
        init_cache(cfg, pol, 1),
        pol,
        probe=lambda q, k, kp: (q, k, kp),
    ).probes
    q = np.asarray(q[0, 0], np.float64).reshape(cfg.num_kv_heads, -1, t, cfg.head_dim)
    k = np.asarray(k[0, 0], np.float64)
    s = np.einsum("kgid,kjd->kgij", q, k) / np.sqrt(cfg.head_dim)
    s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


@pytest.mark.parametrize("kind", ["h2o", "tova"])
@pytest.mark.parametrize("chunk", [1, 4])
def test_attention_scores_match_dense_reference(kind, chunk):
    params = _params(CFG1)
    tokens = np.random.default_rng(5).integers(0, 53, 16)
    policy = PolicyConfig.uniform(1, layer(kind, capacity=16))
    _, cache = stream(params, policy, tokens, 1 if kind == "tova" else chunk)
    a = _dense_probs(params, tokens).sum(1)  # [K, T(query), T(key)], summed over group
    want = a.sum(1) if kind == "h2o" else a[:, -1]
    lc = cache.groups[0]
    pos, score = np.asarray(lc.pos[0, 0]), np.asarray(lc.score[0, 0])
    for h in range(2):
        order = np.argsort(pos[h])
        np.testing.assert_allclose(score[h][order], want[h], atol=1e-5)


def test_per_layer_cache_arrays_have_their_sizes():
    table = PolicyConfig(
        layers=(
            layer("window", capacity=6, n_sink=2),
            layer("h2o", capacity=9),
            layer("full"),
        )
    )
    cache = init_cache(CFG3, table.resolve(64), batch=2)
    assert cache.layer_capacities() == [6, 9, 64]
    shapes = [(g.k.shape, g.pos.shape) for g in cache.groups]
    assert shapes == [
        ((1, 2, 2, 6, 8), (1, 2, 2, 6)),
        ((1, 2, 2, 9, 8), (1, 2, 2, 9)),
        ((1, 2, 2, 64, 8), (1, 2, 2, 64)),
    ]
    assert cache.kv_bytes() == 2 * 2 * 2 * (6 + 9 + 64) * 8 * 4


def test_policy_table_round_trips_and_rejects_gaps(tmp_path):
    table = PolicyConfig(
        layers=(
            layer("window", capacity=36),
            layer("gated", capacity=100),
            layer("gated", capacity=100),
        ),
        name="hybrid",
    )
    path = tmp_path / "p.json"
    path.write_text(table.to_json())
    assert PolicyConfig.from_file(path, 3) == table
    assert "1-2 | gated(100 slots" in table.table()
    with pytest.raises(ValueError, match="does not cover layers \\[2\\]"):
        PolicyConfig.from_json('{"layers": [{"layers": "0-1", "kind": "full"}]}', 3)
    with pytest.raises(ValueError, match="unknown policy"):
        layer("lru")


def test_generate_with_eviction_policy_runs_in_budget():
    params = _params(CFG3)
    policy = PolicyConfig.uniform(3, layer("window", capacity=12, n_sink=2))
    res = generate(params, [[1, 2, 3] * 20, [4, 5] * 7], 10, policy=policy, chunk=8, stop_tokens=())
    assert [len(t) for t in res.tokens] == [10, 10]
    assert res.cache.layer_capacities() == [12, 12, 12]


@pytest.mark.parametrize("kind", ["tova", "h2o"])
def test_attention_policies_batch_like_single_rows(kind):
    """Rows are independent: a short prompt's row, padded while a long one is prefilled,
    decodes as it does alone."""
    params = _params(CFG3)
    policy = PolicyConfig.uniform(3, layer(kind, capacity=10, recent=3))
    prompts = [[7, 3, 9, 1, 4], list(range(1, 40))]
    batch = generate(params, prompts, 6, policy=policy, chunk=8, stop_tokens=()).tokens
    alone = [
        generate(params, [p], 6, policy=policy, chunk=8, stop_tokens=()).tokens[0] for p in prompts
    ]
    assert batch == alone


def test_calibration_rule_classes_and_budget():
    from train.calibrate import table_from_statistics

    stats = {
        "q95": np.array([8.0, 200.0, 300.0, 500.0, 40.0]),
        "long_share": np.array([0.0, 0.005, 0.3, 0.5, 0.2]),
        "live": np.array([5.0, 20.0, 100.0, 300.0, 30.0]),
    }
    table = table_from_statistics(stats, 1024, 0.25, spread=0.0)
    kinds = [p.kind for p in table.layers]
    assert kinds == ["window", "recent", "gated", "gated", "gated"]
    assert table.layers[0].capacity == 36
    assert {p.discount for p in table.layers if p.kind == "gated"} == {0.5}
    expiry = table_from_statistics(stats, 1024, 0.25, spread=0.0, discount=None)
    assert {p.discount for p in expiry.layers if p.kind == "gated"} == {None}
    caps = [p.capacity for p in table.layers]
    assert caps[3] > caps[2] > caps[4] > 48  # Little's law: more live keys, more slots
    assert 0.24 < table.memory_fraction(1024) <= 0.25
    flat = table_from_statistics(stats, 1024, 0.25, spread=100.0)
    fcaps = [p.capacity for p in flat.layers[1:]]
    assert max(fcaps) - min(fcaps) < caps[3] - caps[1]  # spread moves towards equal shares
    with pytest.raises(ValueError, match="cannot give every layer 48 slots"):
        table_from_statistics(stats, 128, 0.25)
    blocked = table_from_statistics(stats, 4096, 0.25, spread=0.0, block=128)
    bcaps = [p.capacity for p in blocked.layers]
    assert bcaps[0] == 36 and all(c % 128 == 0 for c in bcaps[1:])  # a window is one block
    plain = table_from_statistics(stats, 4096, 0.25, spread=0.0)
    assert [c - b for c, b in zip([p.capacity for p in plain.layers], bcaps)] == [
        c % 128 if i else 0 for i, c in enumerate(p.capacity for p in plain.layers)
    ]


def test_calibration_budgets_only_the_global_layers_of_a_windowed_model():
    """Windowed layers keep their native cache; the budget is the global layers' share."""
    from train.calibrate import table_from_statistics

    windows = (16, 0, 16, 0)
    stats = {
        "q95": np.array([8.0, 300.0, 400.0, 500.0]),
        "long_share": np.array([0.0, 0.3, 0.4, 0.5]),
        "live": np.array([5.0, 100.0, 100.0, 100.0]),
        "windows": np.array(windows),
    }
    table = table_from_statistics(stats, 1024, 0.25, spread=0.0)
    assert [p.kind for p in table.layers] == ["full", "gated", "full", "gated"]
    assert table.layers[1].capacity + table.layers[3].capacity == pytest.approx(512, abs=2)
    run = table.resolve(1024, windows)
    assert [p.capacity for p in run.layers] == [16, 256, 16, 256]
    assert [p.window for p in run.layers] == [16, 0, 16, 0]
    assert run.memory_fraction(1024, windows) == pytest.approx((16 + 256) * 2 / (16 + 1024) / 2)
    with pytest.raises(ValueError, match="resolve the policy"):
        init_cache(tiny_config(num_layers=4, layer_windows=windows), table.resolve(1024), 1)

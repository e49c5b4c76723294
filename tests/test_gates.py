"""Gate parameters and apply (smartkv_jax/gates.py) and the mesh helpers (sharding.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from smartkv_jax import sharding as shd
from smartkv_jax.gates import (
    GateConfig,
    Gates,
    GateStat,
    apply_all,
    apply_layer,
    flatten_heads,
    init_gates,
    layer_params,
    num_params,
    predict_layer,
    set_normalization,
    unflatten_heads,
)

L, K, D = 3, 2, 8


def _random_gates(cfg: GateConfig, seed: int = 0) -> Gates:
    """Gates with random (non-zero) weights and statistics, so every path matters."""
    p = init_gates(cfg, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    lk = (cfg.num_layers, cfg.num_kv_heads)
    p = set_normalization(
        p,
        {
            "key_mu": rng.normal(size=(*lk, cfg.head_dim)),
            "key_sigma": np.exp(rng.normal(size=(*lk, cfg.head_dim))),
            "lognorm_mu": rng.normal(size=lk),
            "pair_mu": rng.normal(size=(*lk, cfg.head_dim // 2)),
            "y_mu": 2.0 + rng.normal(size=lk),
            "y_sigma": np.full(lk, 0.7),
        },
    )
    p.w_out[...] = jnp.asarray(rng.normal(size=p.w_out.shape), jnp.float32)
    p.b_out[...] = jnp.asarray(rng.normal(size=p.b_out.shape), jnp.float32)
    return p


apply_all_jit = jax.jit(apply_all)
apply_layer_jit = jax.jit(apply_layer)


@pytest.mark.parametrize(
    "cfg",
    [GateConfig(L, K, D, hidden=16, pair_norms="half"), GateConfig(L, K, D, hidden=0)],
    ids=["mlp", "linear"],
)
def test_apply_layer_matches_apply_all_and_scan(cfg):
    p = _random_gates(cfg)
    n = 10
    keys_NLKD = jnp.asarray(np.random.default_rng(7).normal(size=(n, L, K, D)) * 3, jnp.float32)
    pos_N = jnp.arange(n, dtype=jnp.int32) * 300  # crosses the sinks and pos_clip
    y_NLK = apply_all_jit(p, keys_NLKD, pos_N)
    assert y_NLK.shape == (n, L, K) and y_NLK.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(y_NLK)))

    # one layer, batch of 2 sequences of 5 keys, as the model's layer scan sees them
    k_BKCD = keys_NLKD.reshape(2, 5, L, K, D).transpose(2, 0, 3, 1, 4)  # [L, B, K, C, D]
    pos_BC = pos_N.reshape(2, 5)
    for layer in range(L):
        y_BKC = apply_layer_jit(layer_params(p, layer), k_BKCD[layer], pos_BC)
        want = y_NLK[:, layer].reshape(2, 5, K).transpose(0, 2, 1)
        np.testing.assert_allclose(y_BKC, want, rtol=1e-5, atol=1e-5)

    def body(carry, xs):
        lp, k = xs
        return carry, apply_layer(lp, k, pos_BC)

    _, y_LBKC = jax.jit(lambda p, k: jax.lax.scan(body, 0, (p, k)))(p, k_BKCD)
    want = y_NLK.reshape(2, 5, L, K).transpose(2, 0, 3, 1)
    np.testing.assert_allclose(y_LBKC, want, rtol=1e-5, atol=1e-5)

    # the model's contract: scan over the split state of a group of layers, predict_layer
    graphdef, state = nnx.split(p)
    group = jax.tree.map(lambda a: a[1:], state)  # layers 1.. as one group

    def split_body(carry, xs):
        state_K, k = xs
        return carry, predict_layer(graphdef, state_K, k, pos_BC)

    _, y_group = jax.jit(lambda s, k: jax.lax.scan(split_body, 0, (s, k)))(group, k_BKCD[1:])
    np.testing.assert_allclose(y_group, want[1:], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.jit(lambda g, k: g(k, pos_N))(p, keys_NLKD), y_NLK, rtol=1e-6)


def test_fresh_gate_predicts_label_mean_and_features():
    cfg = GateConfig(L, K, D)
    p = set_normalization(init_gates(cfg, jax.random.key(0)), {"y_mu": jnp.full((L, K), 1.5)})
    y = apply_all_jit(p, np.ones((4, L, K, D), np.float32), jnp.arange(4))
    np.testing.assert_allclose(y, 1.5)
    assert cfg.num_features == D + 1 + 1 + 4
    assert GateConfig(L, K, D, key_norm=False, position=False).num_features == D
    assert num_params(p) == L * K * (cfg.num_features * 32 + 32 + 32 + 1)

    # positions past pos_clip read as pos_clip; sink positions are distinguished
    p = _random_gates(GateConfig(L, K, D, pos_clip=64))
    k = np.broadcast_to(np.random.default_rng(2).normal(size=(1, L, K, D)), (6, L, K, D))
    y = apply_all_jit(p, k.astype(np.float32), jnp.array([64, 100, 5000, 0, 1, 2]))
    np.testing.assert_allclose(y[0], y[1], rtol=1e-6)
    np.testing.assert_allclose(y[0], y[2], rtol=1e-6)
    assert float(jnp.abs(y[3] - y[4]).max()) > 1e-4


def test_normalisation_is_frozen_and_validated():
    cfg = GateConfig(L, K, D)
    p = _random_gates(cfg)
    k = np.random.default_rng(3).normal(size=(5, L, K, D)).astype(np.float32)
    grads = jax.jit(jax.grad(lambda q: jnp.sum(apply_all(q, k, jnp.arange(5)) ** 2)))(p)
    for leaf in jax.tree.leaves(grads.norm):
        assert float(jnp.abs(leaf).max()) == 0.0
    assert float(jnp.abs(grads.w_in).max()) > 0
    with pytest.raises(ValueError, match="shape"):
        set_normalization(p, {"key_mu": jnp.zeros((L, K))})
    with pytest.raises(KeyError, match="unknown"):
        set_normalization(p, {"mean": jnp.zeros((L, K))})
    floored = set_normalization(p, {"key_sigma": jnp.zeros((L, K, D))})
    assert float(floored.norm["key_sigma"].min()) > 0


def test_gates_module_separates_weights_from_statistics():
    p = _random_gates(GateConfig(L, K, D, hidden=16))
    weights = nnx.to_pure_dict(nnx.state(p, nnx.Param))
    assert sorted(weights) == ["b_in", "b_out", "w_in", "w_out"]
    stats = nnx.to_pure_dict(nnx.state(p, GateStat))
    assert sorted(stats) == ["norm"] and "y_sigma" in stats["norm"]
    assert p.w_in.get_metadata("out_sharding") == ("layers", "kv_heads", "features", "hidden")
    assert p.norm["key_mu"].get_metadata("out_sharding") == ("layers", "kv_heads", "head_dim")
    flat = flatten_heads(p, pad_to=8)
    assert flat.w_in.get_metadata("out_sharding") == ("heads", "features", "hidden")
    assert layer_params(p, 0).b_out.get_metadata("out_sharding") == ("kv_heads",)
    assert unflatten_heads(flat).b_in.get_metadata("out_sharding") == p.b_in.get_metadata(
        "out_sharding"
    )
    mesh = shd.make_mesh()
    for g in (p, flat):  # every variable names one known logical axis per array axis
        for _, var in nnx.to_flat_state(nnx.state(g)):
            axes = var.get_metadata("out_sharding")
            assert len(axes) == var[...].ndim
            shd.logical_sharding(mesh, axes)


def test_config_validation_and_roundtrip():
    cfg = GateConfig(L, K, D, hidden=0, activation="relu")
    assert GateConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="activation"):
        GateConfig(L, K, D, activation="softmax")
    with pytest.raises(ValueError, match="hidden"):
        GateConfig(L, K, D, hidden=-1)
    with pytest.raises(ValueError, match="unknown GateConfig"):
        GateConfig.from_dict({**cfg.to_dict(), "depth": 2})


def test_flatten_pads_and_roundtrips():
    p = _random_gates(GateConfig(L, K, D))
    flat = flatten_heads(p, pad_to=8)
    assert flat.w_in.shape == (8, p.cfg.num_features, 32) and flat.b_out.shape == (8,)
    back = unflatten_heads(flat)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(p)):
        np.testing.assert_array_equal(a, b)
    state = p.to_state()
    assert "w_in" in state and Gates.from_state(p.cfg, state).cfg == p.cfg
    lin = init_gates(GateConfig(L, K, D, hidden=0), jax.random.key(0))
    assert lin.w_in is None and "w_in" not in lin.to_state()


def test_mesh_helpers_on_local_devices():
    mesh = shd.make_mesh()
    n = len(jax.devices())
    assert shd.mesh_shape(mesh) == (n, 1)
    assert shd.padded_heads(90, shd.make_mesh(data=n, model=1)) == 90
    with pytest.raises(ValueError, match="does not match"):
        shd.make_mesh(data=n + 1, model=1)
    sh = shd.logical_sharding(mesh, ("batch", "heads", None))
    assert tuple(sh.spec) == ("data", "model", None)
    with pytest.raises(KeyError):
        shd.logical_sharding(mesh, ("tokens",))
    x = np.arange(12.0).reshape(4, 3)
    arr = shd.put_global(x, shd.batch_sharding(mesh, 2))
    np.testing.assert_array_equal(np.asarray(arr), x)
    assert shd.process_row_range(mesh, 8) == (0, 8)

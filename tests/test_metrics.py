"""Losses and R² (train/metrics.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from smartkv_jax.gates import GateConfig, flatten_heads, init_gates
from train.metrics import loss_fn, r2_from_sums, summarize_r2


def test_censored_loss_only_penalises_predictions_below_the_bound():
    gate = GateConfig(1, 1, 4, hidden=0)
    gates_G = flatten_heads(init_gates(gate, jax.random.key(0)))  # predicts 0 everywhere
    batch = {
        "keys": jnp.ones((3, 1, 4)),
        "pos": jnp.array([10, 11, 12]),
        "y": jnp.array([[1.0], [-1.0], [2.0]]),  # prediction 0 is below, above, below
        "lb": jnp.array([[True], [True], [False]]),
        "w": jnp.ones(3),
    }
    got = float(loss_fn(gates_G, batch, jnp.ones(1), loss="censored"))
    np.testing.assert_allclose(got, (1.0 + 0.0 + 4.0) / 3, rtol=1e-6)
    mse = float(loss_fn(gates_G, batch, jnp.ones(1), loss="mse"))
    np.testing.assert_allclose(mse, (1.0 + 1.0 + 4.0) / 3, rtol=1e-6)


def test_r2_from_sums_and_summary():
    y = np.array([1.0, 2.0, 3.0, 4.0])
    yhat = np.array([1.0, 2.5, 2.5, 4.0])
    sums = np.array([[4.0, 4.0], [y.sum(), 4.0], [(y * y).sum(), 4.0], [0.5, 0.0]])
    r2 = r2_from_sums(sums)
    np.testing.assert_allclose(r2[0], 1 - ((y - yhat) ** 2).sum() / ((y - y.mean()) ** 2).sum())
    assert np.isnan(r2[1])  # a head whose labels do not vary
    s = summarize_r2(np.array([[0.5, 0.7], [0.1, np.nan]]))
    assert s["median_r2"] == 0.5 and s["layer0_r2"] == [0.5, 0.7]

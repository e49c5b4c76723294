"""Gate checkpoints (smartkv_jax/gate_checkpoint.py): the on-disk payload, loading, and the
mismatch / corruption checks. Training runs that save and resume: tests/test_train_gates.py."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from smartkv_jax import gate_checkpoint as gc
from smartkv_jax.gates import GateConfig, init_gates, set_normalization

L, K, D = 2, 3, 8
STATS = ("key_mu", "key_sigma", "lognorm_mu", "lognorm_sigma", "pair_mu", "pair_sigma")


def _gates(hidden: int = 16):
    cfg = GateConfig(L, K, D, hidden=hidden)
    g = init_gates(cfg, jax.random.key(0))
    return set_normalization(g, {"y_mu": np.arange(L * K, dtype=np.float32).reshape(L, K)})


def _save(ckpt_dir, gates, step: int = 7, **meta):
    manager = gc.open_manager(ckpt_dir, 0)
    payload = jax.tree.map(np.asarray, gates.to_state())
    state = {"params": payload, "opt": {"0": np.zeros((L, K, 4), np.float32)}, "step": step}
    meta = {
        "format": gc.CKPT_FORMAT,
        "model": "m",
        "tau": 0.05,
        "gate_config": gates.cfg.to_dict(),
        "store_shape": [L, K, D],
        "train_config": {"lr": 0.01},
        "checksum": gc.checksum(payload),
        "step": step,
        **meta,
    }
    gc.save_state(manager, step, state, meta)
    manager.close()


@pytest.mark.parametrize("hidden", [16, 0], ids=["mlp", "linear"])
def test_payload_layout_and_load_round_trip(tmp_path, hidden):
    gates = _gates(hidden)
    payload = gates.to_state()  # the layout every checkpoint holds
    want = {"norm", "w_out", "b_out"} | ({"w_in", "b_in"} if hidden else set())
    assert set(payload) == want
    assert set(payload["norm"]) == {*STATS, "y_mu", "y_sigma"}
    _save(tmp_path / "ckpt", gates)
    loaded, meta = gc.load_gates(tmp_path / "ckpt")
    assert meta["step"] == 7 and loaded.cfg == gates.cfg
    for a, b in zip(jax.tree.leaves(loaded.to_state()), jax.tree.leaves(payload)):
        np.testing.assert_array_equal(a, b)


def test_damaged_or_foreign_checkpoints_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no gate checkpoint directory"):
        gc.load_gates(tmp_path / "missing")
    _save(tmp_path / "bad_sum", _gates(), checksum=[0.0, 0.0])
    with pytest.raises(gc.CheckpointCorruptError, match="fails its checksum"):
        gc.load_gates(tmp_path / "bad_sum")
    _save(tmp_path / "foreign", _gates(), format="something-else")
    with pytest.raises(gc.CheckpointCorruptError, match="no smartkv-gates/1 metadata"):
        gc.load_gates(tmp_path / "foreign")


def test_restore_refuses_another_state_layout(tmp_path):
    _save(tmp_path / "ckpt", _gates())
    manager = gc.open_manager(tmp_path / "ckpt", 0)
    try:
        saved = manager.item_metadata(7)["state"]
        abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), saved)
        restored = gc.restore_state(manager, 7, abstract, "ckpt")
        assert int(restored["step"]) == 7
        abstract["opt"]["0"] = jax.ShapeDtypeStruct((L, K, 5), np.float32)
        with pytest.raises(gc.CheckpointMismatchError, match=r"\['opt'\]\['0'\]"):
            gc.restore_state(manager, 7, abstract, "ckpt")
    finally:
        manager.close()


def test_compatibility_check():
    gates = _gates()
    saved = {
        "model": "m",
        "tau": 0.05,
        "store_shape": [L, K, D],
        "gate_config": gates.cfg.to_dict(),
        "train_config": {"lr": 0.01, "steps": 10},
    }
    expected = {**saved, "train_config": {"lr": 0.01, "steps": 20}}
    gc.check_compatible(saved, expected, 3, "here")  # more steps: fine, silently
    with pytest.warns(UserWarning, match="lr: 0.01 -> 0.02"):
        gc.check_compatible(saved, {**saved, "train_config": {"lr": 0.02}}, 3, "here")
    with pytest.raises(gc.CheckpointMismatchError, match="tau 0.05 != 0.11.*hidden: 16 != 8"):
        other = GateConfig(L, K, D, hidden=8).to_dict()
        gc.check_compatible(saved, {**saved, "tau": 0.11, "gate_config": other}, 3, "here")

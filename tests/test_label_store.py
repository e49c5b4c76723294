"""Label stores (train/label_store.py): the writer's format read back, joining stores,
format checks and the held-out rows."""

from __future__ import annotations

import numpy as np
import pytest

from train.label_store import StoreWriter, eval_rows, label_of, open_store

from .label_stores import CAP, TAUS, D, K, L, T, make_store


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    root = tmp_path_factory.mktemp("stores")
    make_store(root / "train", n_windows=8, seed=0)
    return root


def test_store_opens_with_the_labels_schema(root):
    s = open_store(root / "train")
    assert s.shape == (L, K, D) and s.num_rows == 8 * T
    assert s.keys_NLKD.shape == (8 * T, L, K, D) and s.keys_NLKD.dtype == np.float32
    assert s.lifespan_NTLK.shape == (8 * T, 2, L, K)
    np.testing.assert_allclose(s.labels(0.11)[5], np.log1p(s.lifespan_NTLK[5, 1]) / np.log(4))
    assert s.censored_N.sum() == 8 * (CAP - 1) + 8 and s.pos_N[T + 3] == 3
    with pytest.raises(ValueError, match=r"tau 0.2 is not in label store"):
        s.tau_index(0.2)
    with pytest.raises(FileNotFoundError, match="not a label store"):
        open_store(root)
    other = make_store(root / "other_model", n_windows=1, seed=2, model="other")
    with pytest.raises(ValueError, match="cannot join label stores .*: model differs"):
        open_store([root / "train", other])


def test_writer_checks_the_metadata_and_rows_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    writer = StoreWriter(L, K, D, len(TAUS))
    pos = np.arange(4, dtype=np.int32)
    labels = {
        "key": rng.normal(size=(4, L, K, D)).astype(np.float32),
        "lifespan": rng.integers(0, CAP, size=(4, len(TAUS), L, K)).astype(np.int32),
        "censored": pos > 2,
        "pos": pos,
    }
    writer.add_window(labels, "a.txt", 3)
    meta = {"model": "m", "taus": list(TAUS), "cap": CAP}
    with pytest.raises(ValueError, match="metadata.json has no 'num_layers'"):
        writer.write(tmp_path / "s", meta)
    assert not (tmp_path / "s").exists()
    writer.write(tmp_path / "s", {**meta, "num_layers": L, "num_kv_heads": K, "head_dim": D})
    s = open_store(tmp_path / "s", in_memory=False)
    np.testing.assert_array_equal(s.keys_NLKD, labels["key"])
    np.testing.assert_array_equal(s.lifespan_NTLK, labels["lifespan"])
    np.testing.assert_array_equal(s.censored_N, labels["censored"])
    np.testing.assert_allclose(label_of(np.array([0, 3, 15])), [0.0, 1.0, 2.0], rtol=1e-6)
    np.testing.assert_array_equal(eval_rows(s), [0, 1, 2])
    np.testing.assert_array_equal(eval_rows(s, max_rows=2), [0, 2])

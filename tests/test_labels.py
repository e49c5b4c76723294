"""Lifespan labels from hand-built attention matrices: GQA max, tau boundary, cap, censoring,
sinks; and a real-model window against the dense path."""

from __future__ import annotations

import numpy as np
import pytest

from train.labels import all_layer_lifespans, censored

from .conftest import tiny_config


def qk_for_attention(a_GTT: np.ndarray):
    """Queries and one-hot keys whose causal softmax attention is exactly a_GTT (rows of
    each [T, T] matrix are distributions over j <= i). Returns q [1, 1, G, T, T] and
    k [1, 1, 1, T, T] (layer and batch axes first; head dim D = T)."""
    g, t, _ = a_GTT.shape
    scale = t**-0.5
    q = np.log(np.maximum(a_GTT, 1e-30)) / scale  # logit(i, j) = q_i . e_j * scale
    k = np.eye(t, dtype=np.float32)
    return q[None, None].astype(np.float32), k[None, None, None]


def attention(t: int, entries: dict[tuple[int, int], float], g: int = 1) -> np.ndarray:
    """[G, T, T]: each row i puts the given mass on (i, j) for head h and spreads the rest
    evenly over its other causal keys. entries: {(h, i, j): p}."""
    a = np.zeros((g, t, t))
    for h in range(g):
        for i in range(t):
            fixed = {j: p for (hh, ii, j), p in entries.items() if hh == h and ii == i}
            rest = [j for j in range(i + 1) if j not in fixed]
            for j, p in fixed.items():
                a[h, i, j] = p
            if rest:
                a[h, i, rest] = (1 - sum(fixed.values())) / len(rest)
            else:
                a[h, i] /= a[h, i].sum()
    return a


def run(a_GTT, taus=(0.05,), cap=None, t=None):
    q, k = qk_for_attention(a_GTT)
    t = a_GTT.shape[1]
    out = all_layer_lifespans(q, k, tuple(taus), cap or t, "blockwise")
    return np.asarray(out)[0, :, 0, 0]  # [n_tau, T]


def test_tau_boundary_is_strict():
    t = 40  # uniform rows give 1/(i+1): not above 0.05 once i >= 19
    a = attention(t, {(0, 30, 3): 0.0501, (0, 35, 4): 0.0499})
    life = run(a)[0]
    assert life[3] == 27  # 30 - 3: just above tau
    assert life[4] == 18 - 4  # 0.0499 does not count; uniform rows pass while 1/(i+1) > tau
    assert life[t - 1] == 0  # only the query at j itself


def test_gqa_group_takes_the_max_over_heads():
    t = 40
    a = attention(t, {(0, 25, 2): 0.3, (1, 33, 2): 0.3}, g=2)
    assert run(a)[0][2] == 31  # head 1 sees key 2 latest
    assert run(a[:1])[0][2] == 23  # head 0 alone


def test_sink_is_clipped_at_cap_and_late_keys_are_censored():
    t, cap = 48, 16
    a = attention(t, {(0, i, 0): 0.6 for i in range(t)})
    life = run(a, cap=cap)[0]
    assert life[0] == cap  # attended by every query: lifespan t - 1 clipped to the cap
    flags = censored(t, cap)
    assert not flags[: t - cap].any() and flags[t - cap :].all()


def test_two_taus_at_once():
    t = 40
    a = attention(t, {(0, 30, 5): 0.08})
    low, high = run(a, taus=(0.05, 0.11))
    assert low[5] == 25 and high[5] == 8 - 5  # at 0.11 only uniform rows i <= 8 pass


@pytest.mark.parametrize("method", ["blockwise", "dense"])
def test_methods_agree_on_random_attention(method):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 1, 4, 70, 8)).astype(np.float32) * 2
    k = rng.standard_normal((2, 1, 2, 70, 8)).astype(np.float32) * 2
    want = np.asarray(all_layer_lifespans(q, k, (0.05, 0.11), 30, "dense"))
    got = np.asarray(all_layer_lifespans(q, k, (0.05, 0.11), 30, method))
    np.testing.assert_array_equal(got, want)
    assert want.max() == 30 and want.min() == 0


class _ByteTokenizer:
    def __call__(self, text):
        return type("Enc", (), {"input_ids": [b % 53 for b in text.encode()]})()


def test_extract_labels_writes_a_readable_store(tmp_path):
    import jax

    from smartkv_jax.model import Transformer
    from train.label_store import open_store
    from train.labels import extract_labels

    model = Transformer.init_random(tiny_config(), jax.random.PRNGKey(0))
    (tmp_path / "books").mkdir()
    (tmp_path / "books" / "a.txt").write_text("the quick brown fox jumps " * 20)
    (tmp_path / "books" / "b.txt").write_text("over the lazy dog again " * 20)

    def label(out, **kw):
        return extract_labels(
            model,
            _ByteTokenizer(),
            tmp_path / out,
            model_name="tiny",
            source=tmp_path / "books",
            cap=16,
            chunk=32,
            **{"window": 64, **kw},
        )

    meta = label("store", books=["a"], windows_per_doc=2)
    assert meta["sources"] == ["a.txt"] and meta["n_windows"] == 2
    store = open_store(tmp_path / "store")
    assert store.keys_NLKD.shape == (128, 2, 2, 8)
    assert store.lifespan_NTLK.shape == (128, 2, 2, 2)
    assert store.censored_N.sum() == 2 * 16
    assert store.lifespan_NTLK.max() <= 16
    # windows 0 and 1 labelled separately (--first-window) join into the same rows
    for first in (0, 1):
        label(f"w{first}", books=["a"], windows_per_doc=1, first_window=first)
    parts = [tmp_path / "w0", tmp_path / "w1"]
    joined = open_store(parts)
    np.testing.assert_array_equal(joined.keys_NLKD, store.keys_NLKD)
    np.testing.assert_array_equal(joined.lifespan_NTLK, store.lifespan_NTLK)
    np.testing.assert_array_equal(joined.pos_N, store.pos_N)
    assert joined.meta["n_windows"] == 2 and joined.name == f"{parts[0]} + {parts[1]}"
    with pytest.raises(ValueError, match="tokens 64..127 of a.txt in .*w1 overlap tokens 64"):
        open_store([tmp_path / "store", parts[1]])
    # a store of longer windows joins when its tokens are others: 128..255 beside 0..63
    label("long", books=["a"], windows_per_doc=1, first_window=1, window=128)
    mixed = open_store([parts[0], tmp_path / "long"])
    assert mixed.num_rows == 64 + 128 and mixed.meta["window"] == [64, 128]
    assert mixed.censored_N.sum() == 2 * 16  # each window censors its own last keys
    label("long0", books=["a"], windows_per_doc=1, window=128)  # tokens 0..127
    with pytest.raises(ValueError, match="tokens 0..127 of a.txt in .*long0 overlap tokens 64"):
        open_store([parts[1], tmp_path / "long0"])
    with pytest.raises(ValueError, match="no window of 64 from window 9"):
        label("late", books=["a"], first_window=9)
    with pytest.raises(FileNotFoundError, match="books not found"):
        label("x", books=["zzz"])


def test_padded_window_gives_the_same_labels():
    """A window run padded to a multiple of 64 tokens (the oracle's shared programs) equals
    the same window run as it is; a tau a padding query could reach is refused."""
    import jax

    from smartkv_jax.model import Transformer
    from train.labels import window_labels

    model = Transformer.init_random(tiny_config(max_position=256), jax.random.PRNGKey(3))
    model = jax.tree_util.tree_map(lambda a: a * 4 if a.ndim == 3 else a, model)  # peaky
    tokens = np.random.default_rng(0).integers(0, 53, 100).tolist()
    plain = window_labels(model, tokens, taus=(0.02, 0.1), cap=100, chunk=100)
    padded = window_labels(model, tokens, taus=(0.02, 0.1), cap=100, chunk=64, pad_to=64)
    for name in ("lifespan", "censored", "pos"):
        np.testing.assert_array_equal(padded[name], plain[name])
    np.testing.assert_allclose(padded["key"], plain["key"], atol=1e-5)
    assert plain["lifespan"].shape == (100, 2, 2, 2) and plain["lifespan"].max() > 10
    with pytest.raises(ValueError, match="pad_to=1"):
        window_labels(model, tokens, taus=(0.005,), cap=100, chunk=64, pad_to=64)


def test_zero_queries_end_no_lifespan():
    """Why padding is inert: zeroed queries appended after T keys leave every lifespan as it
    was, where real queries in their place extend some."""
    rng = np.random.default_rng(1)
    t, n = 40, 64
    q = rng.normal(size=(1, 1, 2, n, 8)).astype(np.float32) * 3  # peaky attention
    k = rng.normal(size=(1, 1, 1, n, 8)).astype(np.float32)
    plain = np.asarray(all_layer_lifespans(q[:, :, :, :t], k[:, :, :, :t], (0.05,), n, "blockwise"))
    zeroed = q.copy()
    zeroed[:, :, :, t:] = 0.0
    padded = np.asarray(all_layer_lifespans(zeroed, k, (0.05,), n, "blockwise"))
    live = np.asarray(all_layer_lifespans(q, k, (0.05,), n, "blockwise"))
    np.testing.assert_array_equal(padded[..., :t], plain)
    assert (live[..., :t] > plain).any()

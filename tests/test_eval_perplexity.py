"""Streaming perplexity: exactness against one full forward pass, protocol labels, the paired
bootstrap and the text sources (offline fallback)."""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
import pytest

from eval import perplexity as P
from smartkv_jax import data as text_data
from smartkv_jax.model import Transformer
from smartkv_jax.policy import OraclePolicy, WindowPolicy
from smartkv_jax.policy_table import PolicyConfig

from .conftest import full_logits
from .test_eval_needle import CFG, tiny_params


def _reference_nll(model, tokens_BT: np.ndarray) -> np.ndarray:
    """NLL [B, T-1] of one forward pass over whole sequences (full cache)."""
    logits = full_logits(model, tokens_BT).astype(np.float64)
    m = logits.max(-1, keepdims=True)
    lse = (m[..., 0] + np.log(np.exp(logits - m).sum(-1)))[:, :-1]
    tgt = np.take_along_axis(logits[:, :-1], tokens_BT[:, 1:, None], -1)[..., 0]
    return lse - tgt


@pytest.mark.parametrize("chunk", [1, 7])
def test_streaming_full_policy_equals_one_forward_pass(chunk):
    params = tiny_params()
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 40)).astype(np.int32)
    want = _reference_nll(params, tokens)
    got, cache = P.streaming_nll(
        params, PolicyConfig.uniform(3), tokens, chunk=chunk, progress=False
    )
    assert got.shape == (2, 39)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert P.perplexity(got) == pytest.approx(math.exp(want.mean()), rel=1e-4)
    assert cache.layer_capacities() == [40, 40, 40]


def test_small_budget_changes_perplexity_and_memory_is_measured():
    params = tiny_params()
    tokens = np.random.default_rng(1).integers(0, CFG.vocab_size, (2, 40)).astype(np.int32)
    books = [P.Book(f"b{i}", row) for i, row in enumerate(tokens)]
    pol = PolicyConfig.uniform(3, WindowPolicy(capacity=10, n_sink=2))
    res = P.evaluate_perplexity(params, pol, books, chunk=7, progress=False)
    full = P.evaluate_perplexity(params, PolicyConfig.uniform(3), books, progress=False)
    assert res.protocol == "chunked(7), approximate"
    assert full.protocol == "token-by-token (exact)"
    assert res.memory_actual == pytest.approx(10 / 40)
    assert full.memory_actual == pytest.approx(1.0)
    assert res.ppl != pytest.approx(full.ppl, rel=1e-6)
    assert len(res.ppl_per_book) == 2 and res.nll.shape == (2, 39)
    assert P.position_curve(res.nll).shape == (39,)


def test_memory_is_measured_against_the_native_cache():
    """Windowed layers keep W slots natively: the full cache is 100%, and a budget counts
    the windowed layers' native slots besides the global layer's budget."""
    cfg = dataclasses.replace(CFG, layer_windows=(16, 0, 16))
    params = Transformer.init_random(cfg, jax.random.PRNGKey(0))
    tokens = np.random.default_rng(1).integers(0, CFG.vocab_size, (1, 40)).astype(np.int32)
    books = [P.Book("b", tokens[0])]
    full = P.evaluate_perplexity(params, PolicyConfig.uniform(3), books, progress=False)
    pol = PolicyConfig.uniform(3, WindowPolicy(capacity=10, n_sink=2))
    res = P.evaluate_perplexity(params, pol, books, progress=False)
    assert full.memory_actual == pytest.approx(1.0)
    assert res.memory_actual == pytest.approx((16 + 10 + 16) / (16 + 40 + 16))


def test_oracle_policy_streams_with_true_lifespans():
    params = tiny_params()
    tokens = np.random.default_rng(2).integers(0, CFG.vocab_size, (2, 32)).astype(np.int32)
    oracle = P.oracle_for_books(params, tokens, tau=0.05, progress=False)
    assert oracle.shape == (3, 2, 2, 32)
    assert (oracle >= 0).all() and oracle.max() > 0
    pol = PolicyConfig.uniform(3, OraclePolicy(capacity=8, n_sink=1, recent=2))
    nll, _ = P.streaming_nll(params, pol, tokens, chunk=1, oracle_LBKT=oracle, progress=False)
    assert np.isfinite(nll).all()
    with pytest.raises(ValueError, match="oracle"):
        P.streaming_nll(params, pol, tokens, progress=False)


def test_protocol_names():
    assert P.protocol_name(1) == "token-by-token (exact)"
    assert P.protocol_name(64) == "chunked(64), approximate"
    with pytest.raises(ValueError):
        P.protocol_name(0)


def test_paired_bootstrap():
    rng = np.random.default_rng(0)
    a = rng.normal(3.0, 1.0, (3, 500))
    same = P.paired_bootstrap(a, a, n_boot=200)
    assert same["rel_diff"] == 0 and same["lo"] == 0 and same["hi"] == 0
    shifted = P.paired_bootstrap(a + 0.1, a, n_boot=200)
    assert shifted["rel_diff"] == pytest.approx(math.expm1(0.1))
    assert shifted["lo"] == pytest.approx(math.expm1(0.1)) == shifted["hi"]
    noise = rng.normal(0.05, 0.5, a.shape)
    noisy = P.paired_bootstrap(a + noise, a, n_boot=400, seed=1)
    assert noisy["rel_diff"] == pytest.approx(math.expm1(noise.mean()))
    assert noisy["lo"] < noisy["rel_diff"] < noisy["hi"]
    half_width = 1.96 * noise.std() / math.sqrt(noise.size)  # normal approximation, log scale
    assert math.log1p(noisy["hi"]) - math.log1p(noisy["lo"]) == pytest.approx(
        2 * half_width, rel=0.25
    )
    assert P.paired_bootstrap(a, a + 0.01, n_boot=50) == P.paired_bootstrap(a, a + 0.01, n_boot=50)
    with pytest.raises(ValueError, match="equal shapes"):
        P.paired_bootstrap(a, a[:, :10])


class _WordTokenizer:
    def __call__(self, text, add_special_tokens=True):
        class Enc:
            input_ids = [len(w) % 50 for w in text.split()]

        return Enc()


def test_books_fall_back_to_local_text_offline(tmp_path, monkeypatch):
    monkeypatch.setattr(P, "hub_reachable", lambda *a, **k: False)
    monkeypatch.setattr(text_data, "DEFAULT_TEXT_DIR", tmp_path)
    (tmp_path / "a.txt").write_text("word " * 30)
    (tmp_path / "b.txt").write_text("word " * 5)  # too short: skipped
    (tmp_path / "c.txt").write_text("other " * 40)
    books, desc = P.load_books(_WordTokenizer(), source="auto", n_books=5, n_tokens=20)
    assert [b.name for b in books] == ["a", "c"]
    assert all(len(b.ids) == 20 for b in books)
    assert "local books" in desc and "skipped" in desc and "b" in desc
    with pytest.raises(ConnectionError, match="unreachable"):
        P.load_books(_WordTokenizer(), source="pg19", n_tokens=20)
    with pytest.raises(ValueError, match="no book"):
        P.load_books(_WordTokenizer(), source=str(tmp_path), n_tokens=1000)

"""Prefill + decode against one full forward pass, batching, sampling and stop tokens."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smartkv_jax.cache import init_cache
from smartkv_jax.generate import generate, prefill
from smartkv_jax.model import Transformer
from smartkv_jax.policy_table import PolicyConfig
from smartkv_jax.sampling import SamplingConfig, sample
from smartkv_jax.step import split_model

from .conftest import chunk_logits, full_logits, tiny_config

CFG = tiny_config(vocab_size=61, eos_token_ids=(3,))


@pytest.fixture(scope="module")
def params():
    p = Transformer.init_random(CFG, jax.random.PRNGKey(0))
    # larger weights than init so attention is far from uniform
    return jax.tree_util.tree_map(lambda a: a * 8 if a.ndim == 3 else a, p)


def _chunk_logits(model, policy, tokens_BC, pos_BC, cache):
    """Logits [B, C, V] of a chunk and the updated cache."""
    graph, state = split_model(model, cache)
    logits, cache = chunk_logits(graph, state, policy, tokens_BC, pos_BC, cache)
    return np.asarray(logits), cache


@pytest.mark.parametrize("chunk", [1, 3, 8, 40])
def test_chunked_prefill_matches_full_forward(params, chunk):
    t = 40
    tokens = np.random.default_rng(1).integers(0, CFG.vocab_size, (2, t))
    want = full_logits(params, tokens)
    policy = PolicyConfig.uniform(CFG.num_layers).resolve(t)
    cache = init_cache(CFG, policy, 2)
    got = []
    for s in range(0, t, chunk):
        toks = tokens[:, s : s + chunk]
        pos = np.broadcast_to(np.arange(s, s + toks.shape[1]), toks.shape)
        logits, cache = _chunk_logits(params, policy, toks, pos, cache)
        got.append(logits)
    np.testing.assert_allclose(np.concatenate(got, 1), want, atol=1e-4, rtol=0)


def test_batch_of_different_lengths_decodes_like_full_forward(params):
    rng = np.random.default_rng(2)
    lengths = [5, 17, 11]
    total = 24
    seqs = rng.integers(0, CFG.vocab_size, (3, total))
    policy = PolicyConfig.uniform(CFG.num_layers).resolve(64)
    cache = init_cache(CFG, policy, 3)
    prompts = [s[:n].tolist() for s, n in zip(seqs, lengths)]
    last, cache, _ = prefill(params, policy, [prompts], cache, chunk=8)
    step_logits = [np.asarray(last)]
    pos = np.array(lengths)
    for i in range(4):  # teacher-forced decode, each row at its own position
        tok = seqs[np.arange(3), pos + i]
        logits, cache = _chunk_logits(params, policy, tok[:, None], (pos + i)[:, None], cache)
        step_logits.append(logits[:, 0])
    for b, n in enumerate(lengths):
        want = full_logits(params, seqs[b : b + 1, : n + 4])[0, n - 1 :]
        got = np.stack([s[b] for s in step_logits])
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_greedy_generate_matches_argmax_of_full_forward(params):
    prompts = [[5, 9, 12, 7], [8, 1, 30, 44, 2, 19, 23]]
    res = generate(params, prompts, 6, stop_tokens=(), chunk=4)
    for prompt, out in zip(prompts, res.tokens):
        seq = list(prompt)
        for _ in range(6):
            seq.append(int(full_logits(params, np.array([seq]))[0, -1].argmax()))
        assert out == seq[len(prompt) :]
    assert res.decode_steps == 5


def test_stop_tokens_end_rows_independently(params):
    prompts = [[5, 9, 12, 7], [8, 1, 30]]
    free = generate(params, prompts, 8, stop_tokens=()).tokens
    stop = free[0][2]
    res = generate(params, prompts, 8, stop_tokens=(stop,)).tokens
    assert res[0] == free[0][:3]
    cut = next((i + 1 for i, t in enumerate(free[1]) if t == stop), len(free[1]))
    assert res[1] == free[1][:cut]


def test_sampling_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 256))
    keys = jax.random.split(jax.random.PRNGKey(0), 8)
    greedy = sample(logits, keys[0], SamplingConfig())
    assert (greedy == 0).all()
    top1 = sample(logits, keys[1], SamplingConfig(temperature=1.0, top_k=1))
    assert (top1 == 0).all()
    top2 = np.asarray(sample(logits, keys[2], SamplingConfig(temperature=1.0, top_k=2)))
    assert set(top2.tolist()) == {0, 1}
    nucleus = np.asarray(sample(logits, keys[3], SamplingConfig(temperature=1.0, top_p=0.7)))
    assert set(nucleus.tolist()) == {0, 1}  # 0.5 < 0.7 needs the second token, not the third
    free = np.asarray(sample(logits, keys[4], SamplingConfig(temperature=1.0)))
    assert set(free.tolist()) == {0, 1, 2, 3}
    with pytest.raises(ValueError):
        SamplingConfig(top_p=0.0)


def test_generate_rejects_context_over_limit(params):
    with pytest.raises(ValueError, match="context limit of 128"):
        generate(params, [[1] * 100], 40)
    with pytest.raises(ValueError, match="at least one token"):
        generate(params, [[]], 4)


def test_bfloat16_params_and_cache(params):
    bf16 = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), params)
    tokens = np.random.default_rng(3).integers(0, CFG.vocab_size, (1, 24))
    want = full_logits(params, tokens)
    got = full_logits(bf16, tokens)
    assert got.dtype == np.float32
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()
    res = generate(bf16, [tokens[0].tolist()], 4, stop_tokens=())
    assert res.cache.groups[0].k.dtype == jnp.bfloat16
    assert len(res.tokens[0]) == 4


def test_context_segment_decodes_like_one_prompt(params):
    """A context read in chunks of its own, then the prompt: with the full cache the
    chunking cannot matter, so the tokens equal those of the concatenated prompt."""
    context, prompt = [[4, 8, 15, 16, 23, 42, 7]], [[9, 2, 5]]
    split = generate(params, prompt, 6, context=context, stop_tokens=(), chunk=4)
    joined = generate(params, [context[0] + prompt[0]], 6, stop_tokens=(), chunk=4)
    assert split.tokens == joined.tokens
    with pytest.raises(ValueError, match="2 contexts for 1 prompts"):
        generate(params, prompt, 2, context=context * 2)


def test_prefill_probes_cover_every_chunk(params):
    res = generate(params, [[1, 2, 3, 4, 5, 6]], 2, chunk=4, probe=_pre_rope_keys)
    assert len(res.probes) == 2  # 6 tokens in chunks of 4
    assert res.probes[0].shape == (CFG.num_layers, 1, CFG.num_kv_heads, 4, CFG.head_dim)


def _pre_rope_keys(q_BHCD, k_BKCD, k_pre_BKCD):
    return k_pre_BKCD


def test_kernel_setting_is_explicit_and_the_kernel_path_matches(params):
    """A cache built with kernels="interpret" runs the Pallas decode-attention kernel (in
    interpret mode) inside the model; it gives the reference path's tokens and logits."""
    from smartkv_jax.kernels import resolve_kernels, slot_block

    assert resolve_kernels("auto") == "reference" and slot_block("auto") == 1  # a CPU here
    assert slot_block("pallas") == 128
    with pytest.raises(ValueError, match="unknown kernel mode"):
        resolve_kernels("cuda")
    tokens = np.random.default_rng(4).integers(0, CFG.vocab_size, (2, 12))
    policy = PolicyConfig.uniform(CFG.num_layers).resolve(16)
    pos = np.broadcast_to(np.arange(12), tokens.shape)
    got = {}
    for mode in ("reference", "interpret"):
        cache = init_cache(CFG, policy, 2, kernels=mode)
        assert cache.kernels == mode
        first, cache = _chunk_logits(params, policy, tokens[:, :8], pos[:, :8], cache)
        second, _ = _chunk_logits(params, policy, tokens[:, 8:], pos[:, 8:], cache)  # reads 8
        got[mode] = np.concatenate([first, second], axis=1)
    np.testing.assert_allclose(got["interpret"], got["reference"], atol=1e-4, rtol=0)


def test_shrinking_batch_gives_every_row_the_same_tokens(params, monkeypatch):
    """With `shrink`, rows that stopped leave the decode batch (here 8 rows, of which 6 stop
    within the first look, then 2 go on alone): every row's tokens equal those of the whole
    batch decoding to the end."""
    import smartkv_jax.generate as gen

    rng = np.random.default_rng(5)
    prompts = rng.integers(4, CFG.vocab_size, (8, 9)).tolist()
    free = generate(params, prompts, 24, stop_tokens=()).tokens
    late = set(free[6]) | set(free[7])
    stops = tuple(sorted({t for row in free[:6] for t in row[:3]} - late))
    assert all(set(row[:3]) & set(stops) for row in free[:6])  # rows 0-5 stop by step 2
    monkeypatch.setattr(gen, "SHRINK_EVERY", 4)
    gathered = []
    real_gather = gen._gather_rows
    monkeypatch.setattr(
        gen, "_gather_rows", lambda s, r, m: gathered.append(r) or real_gather(s, r, m)
    )

    def run(shrink):
        policy = PolicyConfig.uniform(CFG.num_layers).resolve(64)
        cache = init_cache(CFG, policy, len(prompts))
        return gen.continue_generation(
            params, cache, policy, [prompts], np.zeros(8, np.int64), 24, stop_tokens=stops,
            chunk=16, shrink=shrink,
        ).tokens  # fmt: skip

    want = run(False)
    assert run(True) == want
    assert [len(r) for r in gathered] == [2] and set(gathered[0]) == {6, 7}
    assert [len(t) for t in want[6:]] == [24, 24]  # the rows that went on alone

"""Needle in a haystack: placement at the requested depth, the exact-number scorer, and the
prefill / question / greedy-decode path against `generate`."""

from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eval import needle as N
from smartkv_jax import gates as gate_mod
from smartkv_jax.cache import init_cache
from smartkv_jax.model import Transformer
from smartkv_jax.policy_table import PolicyConfig

from .conftest import tiny_config

CFG = tiny_config(vocab_size=96, num_layers=3, max_position=512)


class CharTokenizer:
    """One token per character (newline + printable ASCII: 96 ids), no special tokens."""

    alphabet = "\n" + "".join(chr(c) for c in range(32, 127))

    def __call__(self, text: str, add_special_tokens: bool = True) -> SimpleNamespace:
        ids = [self.alphabet.find(c) if c in self.alphabet else 1 for c in text]
        return SimpleNamespace(input_ids=ids)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(self.alphabet[i] for i in ids if 0 <= i < len(self.alphabet))


def write_haystack(folder, n_sentences: int = 80) -> None:
    """Two essays of short numbered sentences (each sentence 20-22 characters)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, start in (("a.txt", 0), ("b.txt", n_sentences)):
        text = " ".join(f"Line {i:03d} says hello." for i in range(start, start + n_sentences))
        (folder / name).write_text(text)


def tiny_params(seed: int = 0) -> Transformer:
    """A random model of CFG (weights scaled up so attention is not uniform)."""
    m = Transformer.init_random(CFG, jax.random.PRNGKey(seed))
    return jax.tree_util.tree_map(lambda a: a * 8 if a.ndim == 3 else a, m)


@jax.jit
def _greedy_and_gate_scores(model, tokens_BT, gates):
    """One full-cache forward pass: greedy next tokens [B, T] and every layer's gate
    predictions on its pre-RoPE keys [L, B, K, T]."""
    b, t = tokens_BT.shape
    full = PolicyConfig.uniform(CFG.num_layers).resolve(t)
    pos = jnp.tile(jnp.arange(t)[None], (b, 1))
    out = model(tokens_BT, pos, init_cache(CFG, full, b), full, probe=lambda q, k, kp: kp)
    y = [
        gate_mod.apply_layer(gate_mod.layer_params(gates, i), out.probes[i], pos)
        for i in range(CFG.num_layers)
    ]
    return model.logits(out.hidden).argmax(-1), jnp.stack(y)


def test_needle_is_placed_at_the_requested_depth(tmp_path):
    tok = CharTokenizer()
    write_haystack(tmp_path / "hay")
    hay = N.load_haystack(tok, tmp_path / "hay", 1000)
    for depth in np.linspace(0, 1, 11):
        p = N.build_prompt(tok, hay, 600, float(depth), max_new_tokens=8, seed=3)
        a, e = p.needle_span
        assert tok.decode(p.ids[a:e]) == f" The special magic number is {p.number}."
        assert len(p.number) == 7 and p.number.isdigit()
        assert len(p.ids) + len(p.question) + 8 == 600
        hay_len = len(p.ids) - (e - a)
        assert abs(p.depth_actual - depth) <= 22 / hay_len  # within one sentence
        assert abs(a / hay_len - depth) <= 22 / hay_len  # token fraction, no prefix here
        assert a == 0 or tok.decode(p.ids[a - 1 : a]) == "."  # at a sentence boundary
        assert tok.decode(p.question).startswith("\n\nQuestion: What is the special magic")
        assert tok.decode(p.question).endswith("Answer: The special magic number is")
    # same needle for the same (seed, context, depth); different across depths
    assert N.needle_number(3, 600, 0.5) == N.needle_number(3, 600, 0.5)
    assert N.needle_number(3, 600, 0.5) != N.needle_number(3, 600, 0.6)
    with pytest.raises(ValueError, match="haystack tokens"):
        N.build_prompt(tok, hay, 100, 0.5)


def test_chat_format_wraps_haystack_and_question():
    class ChatTok(CharTokenizer):
        chat_template = "{{ messages }}"

        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
            return f"<u>{messages[0]['content']}</u><a>"

    tok = ChatTok()
    prefix, suffix = N.prompt_parts(tok, "chat")
    assert tok.decode(prefix) == "<u>"
    assert tok.decode(suffix) == f"\n\n{N.QUESTION}</u><a>{N.ANSWER_PREFIX}"
    assert N.resolve_format(tok, "auto") == "chat"
    assert N.resolve_format(CharTokenizer(), "auto") == "plain"
    assert N.prompt_parts(CharTokenizer(), "auto")[0] == []
    with pytest.raises(ValueError, match="unknown prompt format"):
        N.prompt_parts(tok, "xml")


def test_scorer_accepts_only_the_exact_number():
    n = "4821937"
    assert N.score_answer(" 4821937.", n) == 1
    assert N.score_answer("The special magic number is 4821937", n) == 1
    assert N.score_answer(" 4,821,937 is it", n) == 1
    assert N.score_answer(" 482193.", n) == 0  # partial
    assert N.score_answer(" 48219370", n) == 0  # longer
    assert N.score_answer(" 4821936", n) == 0  # wrong digit
    assert N.score_answer(" 1234567 or 4821937", n) == 0  # first number is wrong
    assert N.score_answer(" I do not know.", n) == 0
    assert N.score_answer("", n) == 0


def test_sentence_starts():
    tok = CharTokenizer()
    ids = tok("Hi there. Yes! No? ok\nNext").input_ids
    starts = N.sentence_starts(tok, ids).tolist()
    text = tok.decode(ids)
    assert starts[0] == 0
    assert [text[s - 1] for s in starts[1:]] == [".", "!", "?", "\n"]
    assert N.sentence_starts(tok, tok("A b. C.").input_ids).tolist() == [0, 4, 7]


def test_needle_decode_matches_generate_and_reports_scores(tmp_path):
    tok = CharTokenizer()
    params = tiny_params()
    write_haystack(tmp_path / "hay")
    prompts = N.build_prompts(
        tok, (240,), (0.0, 0.5, 1.0), haystack=tmp_path / "hay", max_new_tokens=6
    )
    gcfg = gate_mod.GateConfig(CFG.num_layers, CFG.num_kv_heads, CFG.head_dim)
    g = gate_mod.init_gates(gcfg, jax.random.PRNGKey(1))
    g.w_out[...] = g.w_out[...] + 0.1  # non-constant predictions

    def oracle_fn(p):
        t = len(p.ids) + len(p.question)
        return np.tile(np.arange(t, dtype=np.float32) / t, (CFG.num_layers, CFG.num_kv_heads, 1))

    res = N.evaluate_needle(
        params,
        tok,
        lambda c: PolicyConfig.uniform(3),
        prompts,
        chunk=16,
        max_new_tokens=6,
        probe_gates=g,
        oracle_fn=oracle_fn,
        stop_tokens=(),
        progress=False,
    )
    assert len(res.cells) == 3 and res.memory_actual == {240: 1.0}
    assert 0.0 <= res.accuracy <= 1.0
    # one full forward pass over prompt + answer: greedy answers are its argmaxes, and the
    # gate scores are the gates on the needle's pre-RoPE keys
    answers = [tok(cell["answer"]).input_ids for cell in res.cells]
    assert all(len(a) == 6 for a in answers)
    rows = np.asarray([list(p.ids + p.question) + a for p, a in zip(prompts, answers)], np.int32)
    n_prompt = len(prompts[0].ids) + len(prompts[0].question)
    greedy, y = _greedy_and_gate_scores(params, jnp.asarray(rows), g)  # [B, T], [L, B, K, T]
    np.testing.assert_array_equal(np.asarray(greedy)[:, n_prompt - 1 : -1], rows[:, n_prompt:])
    for p, cell in zip(prompts, res.cells):
        assert cell["correct"] == N.score_answer(cell["answer"], p.number)
        assert cell["depth_actual"] == pytest.approx(p.depth_actual, abs=1e-6)
    y = np.asarray(y)
    want_gate = np.mean(
        [y[:, b, :, slice(*p.needle_span)].mean(-1) for b, p in enumerate(prompts)], axis=0
    )
    np.testing.assert_allclose(res.layer_needle_score, want_gate, rtol=1e-4, atol=1e-5)
    # true needle score: the oracle's scores averaged over the needle's tokens
    want_true = np.mean([np.arange(*p.needle_span).mean() / n_prompt for p in prompts])
    np.testing.assert_allclose(res.true_layer_needle_score, np.full((3, 2), want_true), rtol=1e-5)

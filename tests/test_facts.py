"""Fact windows for retrieval-aware labels: placement in the uncensored part at sentence
starts, verbatim recall at the end, the book text kept, determinism and errors."""

from __future__ import annotations

import pytest

from train.facts import fact_window

from .test_eval_needle import CharTokenizer


def test_fact_window_places_facts_early_and_recalls_them():
    tok = CharTokenizer()
    book = tok(" ".join(f"Line {i:03d} says hello." for i in range(200))).input_ids
    window, cap = 1024, 256
    ids, spans, values = fact_window(tok, book, window, 3, cap, [7, 1])
    assert len(ids) == window
    text = tok.decode(ids)
    for (a, b), v in zip(spans, values):
        assert 4 <= len(v) <= 8 and v[0] != "0"
        assert tok.decode(ids[a:b]) == f" {v}."
        assert b - 1 <= window - 1 - cap  # every fact token carries an exact label
        sentence = text[:a].rsplit(" The ", 1)
        assert sentence[0].endswith(".")  # inserted at a sentence start
        name = sentence[1].removesuffix(" is")
        assert f"\nQ: What is the {name}?\nA: The {name} is {v}." in text[-400:]
    # book text outside the facts and the recall section is kept in order
    facts_out = text
    for a, b in spans:
        head = text[:a].rsplit(" The ", 1)[1]
        facts_out = facts_out.replace(f" The {head}{tok.decode(ids[a:b])}", "", 1)
    body = facts_out.split("\n\nQ: ")[0]
    assert tok.decode(book).startswith(body)
    again = fact_window(tok, book, window, 3, cap, [7, 1])
    assert again == (ids, spans, values)
    assert fact_window(tok, book, window, 3, cap, [8, 1])[2] != values
    with pytest.raises(ValueError, match="at most 12 facts"):
        fact_window(tok, book, window, 13, cap, 0)
    with pytest.raises(ValueError, match="do not fit"):
        fact_window(tok, book, 256, 3, 200, 0)

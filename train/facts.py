"""Synthetic retrieval facts for label windows.

A lifespan only counts attention from the text that follows a key, and ordinary prose never
looks far back for one exact detail, so keys that a later question will need (a needle) get
short labels. A fact window also holds a few synthetic facts ("The badge number of Doctor
Vance is 58213.") at sentence starts in its uncensored part, and ends with questions that
recall them, answered in full. The answers read the facts' values, so those keys get the long
labels a retrieval needs. The templates share no words with the needle test's sentence
("The special magic number is ...").
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from smartkv_jax.data import encode, sentence_starts

FACT_ITEMS = (
    "access code",
    "badge number",
    "locker combination",
    "account number",
    "ticket number",
    "room number",
    "phone extension",
    "order number",
    "vault code",
    "permit number",
    "serial number",
    "passport number",
)
FACT_OWNERS = (
    "of the north gate",
    "of Captain Reyes",
    "of the old mill",
    "of the east wing",
    "of Miss Harlow",
    "of the river office",
    "of the harbour master",
    "of the blue trunk",
    "of Doctor Vance",
    "of the signal tower",
    "of Mr. Okafor",
    "of the winter cabin",
)


def fact_window(
    tokenizer, book_ids: Sequence[int], window: int, n_facts: int, cap: int, seed
) -> tuple[list[int], list[tuple[int, int]], list[str]]:
    """One window of `window` tokens: book text with `n_facts` fact sentences inserted at
    sentence starts, all before position window - 1 - cap (uncensored), then a recall section
    ("Q: What is the badge number of Doctor Vance?" / "A: The badge number of Doctor Vance is
    58213.") in a shuffled order. Values have 4-8 digits. Returns (ids, value spans [a, b)
    in ids, values); `seed` fixes everything."""
    rng = np.random.default_rng(seed)
    if n_facts > min(len(FACT_ITEMS), len(FACT_OWNERS)):
        raise ValueError(f"at most {min(len(FACT_ITEMS), len(FACT_OWNERS))} facts per window")
    items = rng.choice(len(FACT_ITEMS), n_facts, replace=False)
    owners = rng.choice(len(FACT_OWNERS), n_facts, replace=False)
    names = [f"{FACT_ITEMS[i]} {FACT_OWNERS[o]}" for i, o in zip(items, owners)]
    values = [str(rng.integers(10 ** (d - 1), 10**d)) for d in rng.integers(4, 9, n_facts)]
    heads = [encode(tokenizer, f" The {n} is") for n in names]
    tails = [encode(tokenizer, f" {v}.") for v in values]
    order = rng.permutation(n_facts)
    recall = encode(
        tokenizer,
        "\n\n"
        + "\n".join(
            f"Q: What is the {names[i]}?\nA: The {names[i]} is {values[i]}." for i in order
        ),
    )
    inserted = sum(len(h) + len(t) for h, t in zip(heads, tails))
    n_book = window - len(recall) - inserted
    last = window - 1 - cap - inserted  # facts go before this many book tokens
    if n_book < 1 or last < 1 or len(book_ids) < n_book:
        raise ValueError(f"{n_facts} facts do not fit in a window of {window} with cap {cap}")
    book = [int(x) for x in book_ids[:n_book]]
    starts = sentence_starts(tokenizer, book[:last], newlines=False)
    starts = starts[(starts > 0) & (starts < last)]
    if len(starts) < n_facts:
        raise ValueError(f"the text has {len(starts)} sentence starts, {n_facts} facts needed")
    at = np.sort(rng.choice(starts, n_facts, replace=False))
    ids: list[int] = []
    spans = []
    prev = 0
    for j, head, tail in zip(at, heads, tails):
        ids += book[prev:j] + head
        spans.append((len(ids), len(ids) + len(tail)))
        ids += tail
        prev = j
    ids += book[prev:] + recall
    return ids, spans, values

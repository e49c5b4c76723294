"""RULER-style synthetic long-context tasks: deterministic samples cut to a token length.

Twelve tasks after RULER's (NVIDIA/RULER), with its per-task answer lengths (new tokens)
and metrics; the prompts are worded afresh and every piece of text comes from local files
(`eval.ruler_text.RulerText`):

- niah_*: "One special magic number for <key> is: <value>." needles at uniformly random
  depths (sentence boundaries) of a haystack: the noise filler, essay sentences, or other
  needles. Keys are word pairs ("harbour-velvet") or UUIDs, values 7-digit numbers or
  UUIDs; multikey_1 adds 3 needles with other keys, multivalue gives the key 4 values,
  multiquery asks for 4 keys. Metric "all": every queried value.
- vt: one chain "VAR ABCDE = 12345", "VAR FGHIJ = VAR ABCDE", ... (4 hops) in the noise
  filler; answer: the 5 variables that hold the number.
- cwe: a numbered list in which 10 words appear 30 times and the others 3 times (6 and 1
  below 4096 tokens, as RULER); answer: the 10 common words.
- fwe: random 6-letter coded words with Zipf counts (alpha 2.0), the top rank being the
  noise "...."; answer: the next 3 (the most frequent coded words).
- qa: book passages as numbered documents, with 4 planted facts ("In 1873, Clara Hale hid
  the silver key in the bell tower.") at random depths; one is asked about (who, what,
  where or when). Metric "any": one accepted form suffices.

A sample's `context` is everything before the question (it is compressed before the
question is seen); the plain prompt is `context + question + answer_prefix`. Its size is
fitted on exact token counts: the most haystack such that tokens(context) +
tokens(question) + tokens(answer_prefix) + max_new_tokens + reserve <= length (within
about 1% below it, unless one haystack unit is larger than that). Every sample is drawn
from `np.random.default_rng([seed, task number, length, index])`, so any one sample can be
rebuilt on its own.
"""

from __future__ import annotations

import dataclasses
import functools
import string
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from smartkv_jax.data import encode

from .ruler_text import NOISE, RulerText

NEEDLE = "One special magic {kind} for {key} is: {value}."
FACT = "In {year}, {name} hid the {item} in the {place}."
NOISE_DOTS = "...."
_TOLERANCE = 0.01  # stop fitting once the context is within this fraction of its budget
_SHORT = 4096  # below this length cwe uses RULER's short-context frequencies

FIRST_NAMES = (
    "Clara Tobias Edith Rufus Marian Silas Agnes Jasper Hattie Milo Ada Cyrus Esme Felix "
    "Greta Hollis Ione Lazlo Nell Otto Petra Quincy Rosalind Ambrose"
).split()
SURNAMES = (
    "Hale Wren Marlow Quill Fenwick Ashby Crane Dunmore Everly Garrow Hobb Ivers Kettle "
    "Lorne Mabry Norcott Oakes Pryor Redfern Sallow Thorne Upfield Vane Yardley"
).split()
ITEMS = (
    "silver key",
    "brass compass",
    "velvet purse",
    "copper kettle",
    "ivory chess set",
    "leather journal",
    "pearl necklace",
    "wooden flute",
    "glass lantern",
    "tin soldier",
    "gold pocket watch",
    "oak music box",
    "jade figurine",
    "wool scarf",
    "iron padlock",
    "clay teapot",
)
PLACES = (
    "bell tower",
    "wine cellar",
    "old mill",
    "boathouse",
    "hayloft",
    "chapel crypt",
    "greenhouse",
    "lighthouse",
    "stable loft",
    "attic trunk",
    "well shaft",
    "pantry",
    "dovecote",
    "orchard shed",
    "cloakroom",
    "signal box",
)


@dataclasses.dataclass(frozen=True)
class RulerSample:
    """One sample. context: everything before the question (instruction and haystack);
    question: the query text; answer_prefix: the start of the answer the model continues;
    references: what the answer must contain; max_new_tokens: the task's answer budget;
    metric: "all" (every reference) or "any" (one suffices)."""

    task: str
    index: int
    context: str
    question: str
    answer_prefix: str
    references: tuple[str, ...]
    max_new_tokens: int
    metric: str


@dataclasses.dataclass(frozen=True)
class _Draft:
    """A sample whose haystack size is still open: context(n) holds n haystack units
    (sentences, filler lines, needles, list words or coded words), n_min <= n <= n_max."""

    context: Callable[[int], str]
    question: str
    answer_prefix: str
    references: tuple[str, ...]
    n_min: int
    n_max: int


DraftFn = Callable[[np.random.Generator, RulerText, int], _Draft]  # (rng, text, length)


@dataclasses.dataclass(frozen=True)
class RulerTask:
    """A task: its number in the sample seed, answer budget, metric and draft builder."""

    name: str
    number: int
    max_new_tokens: int
    metric: str
    draft: DraftFn


# ----------------------------------------------------------------------------- random parts


def _distinct(draw: Callable[[], str], k: int, avoid: Sequence[str] = ()) -> list[str]:
    """k distinct strings from `draw`, none of them in `avoid`."""
    out: list[str] = []
    seen = set(avoid)
    while len(out) < k:
        x = draw()
        if x not in seen:
            seen.add(x)
            out.append(x)
    return out


def _number(rng: np.random.Generator, digits: int = 7) -> str:
    return str(int(rng.integers(10 ** (digits - 1), 10**digits)))


def _uuid(rng: np.random.Generator) -> str:
    return str(uuid.UUID(bytes=rng.bytes(16), version=4))


def _word_key(rng: np.random.Generator, words: Sequence[str]) -> str:
    i, j = rng.choice(len(words), 2, replace=False)
    return f"{words[i]}-{words[j]}"


def _letters(rng: np.random.Generator, k: int, alphabet: str) -> str:
    return "".join(alphabet[i] for i in rng.integers(0, len(alphabet), k))


def _drawer(kind: str, rng: np.random.Generator, text: RulerText) -> Callable[[], str]:
    """A draw of one key or value of `kind` ("word", "number" or "uuid")."""
    if kind == "word":
        return lambda: _word_key(rng, text.words)
    return {"number": lambda: _number(rng), "uuid": lambda: _uuid(rng)}[kind]


def _insert(units: Sequence, inserts: Sequence[tuple[float, Any]]) -> list:
    """`units` with each (fraction f, item) of `inserts` placed before unit
    min(int(f * (n + 1)), n), so every boundary 0..n is equally likely; items that land on
    the same boundary keep their order."""
    n = len(units)
    at: dict[int, list] = {}
    for f, item in inserts:
        at.setdefault(min(int(f * (n + 1)), n), []).append(item)
    out = []
    for i in range(n + 1):
        out += at.get(i, [])
        if i < n:
            out.append(units[i])
    return out


def _join_query(keys: Sequence[str]) -> str:
    """ "a", "a and b", "a, b, and c"."""
    if len(keys) <= 2:
        return " and ".join(keys)
    return ", ".join(keys[:-1]) + ", and " + keys[-1]


# ----------------------------------------------------------------------------- niah


@dataclasses.dataclass(frozen=True)
class _Niah:
    """A needle task: haystack ("noise", "essay" or "needle"), key and value kinds, and
    how many keys, values per key and queried keys."""

    haystack: str
    key: str = "word"
    value: str = "number"
    keys: int = 1
    values: int = 1
    queries: int = 1


def _niah_units(
    spec: _Niah, rng: np.random.Generator, text: RulerText, length: int, taken: Sequence[str]
) -> tuple[list[str], str, int]:
    """(haystack units, their separator, n_max): noise lines, essay sentences (cycled), or
    needles whose keys and values are not in `taken` (n_max of them drawn up front; a
    needle is over 10 tokens)."""
    if spec.haystack == "noise":
        return [NOISE] * length, "\n", length
    if spec.haystack == "essay":
        essays = text.essays
        return [essays[i % len(essays)] for i in range(length)], " ", length
    n = length // 10
    kind = _kind_word(spec.value)
    fake_keys = _distinct(_drawer(spec.key, rng, text), n, avoid=taken)
    fake_values = _distinct(_drawer(spec.value, rng, text), n, avoid=taken)
    needles = [NEEDLE.format(kind=kind, key=k, value=v) for k, v in zip(fake_keys, fake_values)]
    return needles, "\n", n


def _kind_word(value: str) -> str:
    return {"number": "number", "uuid": "UUID"}[value]


def _niah_prompt(spec: _Niah, query: str) -> tuple[str, str, str]:
    """(instruction, question, answer prefix), singular when one value is asked for."""
    kind = _kind_word(spec.value)
    if spec.queries * spec.values == 1:
        return (
            f"A special magic {kind} is hidden in the text below. Memorize it; I will ask "
            f"you about this {kind} afterwards.",
            f"\nWhat is the special magic {kind} for {query} mentioned in the text above?",
            f" The special magic {kind} for {query} mentioned in the text above is",
        )
    return (
        f"Some special magic {kind}s are hidden in the text below. Memorize them; I will "
        f"ask you about these {kind}s afterwards.",
        f"\nWhat are all the special magic {kind}s for {query} mentioned in the text above?",
        f" The special magic {kind}s for {query} mentioned in the text above are",
    )


def _niah_draft(spec: _Niah, rng: np.random.Generator, text: RulerText, length: int) -> _Draft:
    """Needles (shuffled) at sorted uniform depths of the haystack; references: the
    queried keys' values."""
    keys = _distinct(_drawer(spec.key, rng, text), spec.keys)
    values = _distinct(_drawer(spec.value, rng, text), spec.keys * spec.values)
    by_key = [values[i * spec.values : (i + 1) * spec.values] for i in range(spec.keys)]
    kind = _kind_word(spec.value)
    needles = [NEEDLE.format(kind=kind, key=k, value=v) for k, vs in zip(keys, by_key) for v in vs]
    needles = [needles[i] for i in rng.permutation(len(needles))]
    inserts = list(zip(np.sort(rng.uniform(size=len(needles))), needles))
    queried = [int(i) for i in rng.choice(spec.keys, spec.queries, replace=False)]
    instruction, question, prefix = _niah_prompt(spec, _join_query([keys[i] for i in queried]))
    units, sep, n_max = _niah_units(spec, rng, text, length, keys + values)

    def context(n: int) -> str:
        return instruction + "\n" + sep.join(_insert(units[:n], inserts))

    refs = tuple(v for i in queried for v in by_key[i])
    return _Draft(context, question, prefix, refs, n_min=1, n_max=n_max)


# ----------------------------------------------------------------------------- vt


def _vt_draft(rng: np.random.Generator, text: RulerText, length: int, hops: int = 4) -> _Draft:
    """One chain of `hops` + 1 assignments, in order, at sorted depths of the noise filler;
    references: every variable in the chain."""
    names = _distinct(lambda: _letters(rng, 5, string.ascii_uppercase), hops + 1)
    value = _number(rng, 5)
    chain = [f"VAR {names[0]} = {value}"]
    chain += [f"VAR {names[i + 1]} = VAR {names[i]}" for i in range(hops)]
    inserts = list(zip(np.sort(rng.uniform(size=len(chain))), chain))
    instruction = "Memorize and follow the chain of variable assignments hidden in the text below."

    def context(n: int) -> str:
        return instruction + "\n\n" + "\n".join(_insert([NOISE] * n, inserts))

    question = (
        f"\nQuestion: Find every variable that is assigned the value {value} in the text above."
    )
    prefix = (
        f" Answer: Following the chain of assignments in the text above, {len(names)} "
        f"variables are assigned the value {value}; they are:"
    )
    return _Draft(context, question, prefix, tuple(names), n_min=1, n_max=length)


# ----------------------------------------------------------------------------- cwe


def _cwe_draft(rng: np.random.Generator, text: RulerText, length: int, common: int = 10) -> _Draft:
    """A shuffled numbered list: `common` words many times, n others a few times each (the
    haystack size is n); references: the common words."""
    freq_common, freq_rare = (30, 3) if length >= _SHORT else (6, 1)
    order = rng.permutation(len(text.words))
    top = [text.words[i] for i in order[:common]]
    rest = [text.words[i] for i in order[common:]]
    shuffle_seed = int(rng.integers(2**63))
    instruction = (
        "Below is a numbered list of words. Some of the words appear more often than the "
        "others. Memorize the ones that appear most often."
    )

    def context(n: int) -> str:
        items = top * freq_common + rest[:n] * freq_rare
        perm = np.random.default_rng([shuffle_seed, n]).permutation(len(items))
        return instruction + "\n" + " ".join(f"{j + 1}. {items[p]}" for j, p in enumerate(perm))

    question = f"\nQuestion: What are the {common} most common words in the list above?"
    prefix = f" Answer: The {common} words that appear most often in the list are:"
    return _Draft(context, question, prefix, tuple(top), n_min=1, n_max=len(rest))


# ----------------------------------------------------------------------------- fwe


def _fwe_draft(
    rng: np.random.Generator, text: RulerText, length: int, alpha: float = 2.0
) -> _Draft:
    """n coded words with Zipf counts floor(n * k^-alpha / Z) over ranks k (Z normalises
    over the vocabulary of max(length // 50, 16) words, rank 1 being the noise "....");
    references: ranks 2-4."""
    size = max(length // 50, 16)
    coded = _distinct(lambda: _letters(rng, 6, string.ascii_lowercase), size - 1)
    vocab = np.asarray([NOISE_DOTS] + coded)
    weights = np.arange(1, size + 1, dtype=np.float64) ** -alpha
    weights /= weights.sum()
    shuffle_seed = int(rng.integers(2**63))
    instruction = (
        "Read the coded text below and keep track of how often each coded word occurs. "
        "Find the three coded words that occur most often."
    )

    def context(n: int) -> str:
        words = np.repeat(vocab, (n * weights).astype(np.int64))
        perm = np.random.default_rng([shuffle_seed, n]).permutation(len(words))
        return instruction + "\n" + " ".join(words[perm].tolist())

    question = (
        f"\nQuestion: Give no explanation, and ignore the dots '{NOISE_DOTS}'. Which three "
        "coded words occur most often in the coded text above?"
    )
    prefix = " Answer: According to the coded text above, the three most frequent words are:"
    # the answer's 3 counts and the next rank's must differ: n * (w4 - w5) >= 1
    n_min = int(np.ceil(1.0 / (weights[3] - weights[4])))
    return _Draft(context, question, prefix, tuple(coded[:3]), n_min=n_min, n_max=2 * length)


# ----------------------------------------------------------------------------- qa


def _facts(rng: np.random.Generator, k: int) -> list[dict[str, str]]:
    """k facts with distinct names, surnames, items, places and years."""
    first, last = rng.permutation(FIRST_NAMES)[:k], rng.permutation(SURNAMES)[:k]
    items, places = rng.permutation(ITEMS)[:k], rng.permutation(PLACES)[:k]
    years = rng.choice(np.arange(1801, 1900), k, replace=False)
    return [
        dict(name=f"{f} {s}", surname=str(s), item=str(i), place=str(p), year=str(y))
        for f, s, i, p, y in zip(first, last, items, places, years)
    ]


def _qa_question(fact: dict[str, str], kind: int) -> tuple[str, tuple[str, ...]]:
    """(question, accepted answers) of one of four kinds: where, who, what, when."""
    name, item, place = fact["name"], fact["item"], fact["place"]
    if kind == 0:
        return f"Where did {name} hide the {item}?", (place, place.split()[-1])
    if kind == 1:
        return f"Who hid the {item} in the {place}?", (name, fact["surname"])
    if kind == 2:
        return f"What did {name} hide in the {place}?", (item, item.split()[-1])
    return f"In what year did {name} hide the {item}?", (fact["year"],)


def _documents(items: Sequence[tuple[int | None, str]]) -> str:
    """ "Document k:" blocks of (passage id, sentence) pairs; a planted sentence (id None)
    joins the passage before it (or after it, at the start)."""
    blocks: list[list[str]] = []
    current = None  # the passage of the last block, once it has one
    for doc, sentence in items:
        if not blocks or (doc is not None and current is not None and doc != current):
            blocks.append([])
        current = doc if doc is not None else current
        blocks[-1].append(sentence)
    return "\n\n".join(f"Document {k + 1}:\n" + " ".join(b) for k, b in enumerate(blocks))


def _qa_draft(rng: np.random.Generator, text: RulerText, length: int, facts: int = 4) -> _Draft:
    """Book passages in random order as documents (haystack unit: a sentence), with
    `facts` planted facts at uniform depths; the question is about the first fact."""
    planted = _facts(rng, facts)
    question, refs = _qa_question(planted[0], int(rng.integers(4)))
    sentences = [FACT.format(**f) for f in planted]
    inserts = list(zip(rng.uniform(size=facts), ((None, s) for s in sentences)))
    order = rng.permutation(len(text.passages))
    stream = [(int(d), s) for d in order for s in text.passages[d]]
    instruction = (
        "Answer the question using the documents below. Give only the answer, with no other words."
    )

    def context(n: int) -> str:
        return instruction + "\n\nThe documents are:\n\n" + _documents(_insert(stream[:n], inserts))

    reminder = instruction.replace("below", "above")
    question = f"\n\n{reminder}\n\nQuestion: {question}"
    return _Draft(context, question, " Answer:", refs, n_min=1, n_max=len(stream))


# ----------------------------------------------------------------------------- registry


def _niah(name: str, number: int, **spec) -> RulerTask:
    return RulerTask(name, number, 128, "all", functools.partial(_niah_draft, _Niah(**spec)))


TASKS: dict[str, RulerTask] = {
    t.name: t
    for t in (
        _niah("niah_single_1", 0, haystack="noise"),
        _niah("niah_single_2", 1, haystack="essay"),
        _niah("niah_single_3", 2, haystack="essay", value="uuid"),
        _niah("niah_multikey_1", 3, haystack="essay", keys=4),
        _niah("niah_multikey_2", 4, haystack="needle"),
        _niah("niah_multikey_3", 5, haystack="needle", key="uuid", value="uuid"),
        _niah("niah_multivalue", 6, haystack="essay", values=4),
        _niah("niah_multiquery", 7, haystack="essay", keys=4, queries=4),
        RulerTask("vt", 8, 30, "all", _vt_draft),
        RulerTask("cwe", 9, 120, "all", _cwe_draft),
        RulerTask("fwe", 10, 50, "all", _fwe_draft),
        RulerTask("qa", 11, 32, "any", _qa_draft),
    )
}


# ----------------------------------------------------------------------------- sizing


def _fit(draft: _Draft, tokenizer: Any, budget: int, task: str, length: int) -> str:
    """The context with the most haystack units whose token count is at most `budget`:
    secant steps on exact counts (through the bracket once a size has failed), bisection
    once those stall; stops within `_TOLERANCE` of the budget."""
    counts: dict[int, int] = {}

    def measure(n: int) -> None:
        counts[n] = len(encode(tokenizer, draft.context(n)))

    measure(draft.n_min)
    if counts[draft.n_min] > budget:
        raise ValueError(
            f"length {length} is too small for task {task!r}: it needs at least "
            f"{length - budget + counts[draft.n_min]} tokens"
        )
    measure(min(draft.n_min + 8, draft.n_max))
    aim = budget * (1 - _TOLERANCE / 2)
    for step in range(64):
        lo = max(n for n, c in counts.items() if c <= budget)
        hi = min([n for n, c in counts.items() if c > budget] + [draft.n_max + 1])
        if hi - lo <= 1 or budget - counts[lo] <= budget * _TOLERANCE:
            break
        near = hi if hi in counts else max(n for n in counts if n < lo)  # secant partner
        slope = (counts[near] - counts[lo]) / (near - lo)
        n = lo + int((aim - counts[lo]) / slope) if slope > 0 and step < 12 else (lo + hi) // 2
        measure(min(max(n, lo + 1), hi - 1))
    if hi > draft.n_max and budget - counts[lo] > 0.03 * length:
        raise ValueError(
            f"length {length} is too long for task {task!r}: its text gives at most "
            f"{length - budget + counts[lo]} tokens"
        )
    return draft.context(lo)


def make_sample(
    task: str,
    tokenizer: Any,
    length: int,
    seed: int,
    index: int,
    haystack: RulerText,
    reserve: int = 0,
) -> RulerSample:
    """Sample `index` of `task` at `length` tokens: tokens(context) + tokens(question) +
    tokens(answer_prefix) + the task's max_new_tokens + `reserve` (e.g. a chat template's
    tokens) <= `length`, within about 1% below it. `haystack`: the loaded local text."""
    if task not in TASKS:
        raise ValueError(f"unknown RULER task {task!r}; use one of {', '.join(TASKS)}")
    for name, value in (("seed", seed), ("index", index), ("reserve", reserve)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if length <= 0:
        raise ValueError(f"length must be positive, got {length}")
    spec = TASKS[task]
    draft = spec.draft(np.random.default_rng([seed, spec.number, length, index]), haystack, length)
    fixed = len(encode(tokenizer, draft.question)) + len(encode(tokenizer, draft.answer_prefix))
    budget = length - fixed - spec.max_new_tokens - reserve
    if budget <= 0:
        raise ValueError(
            f"length {length} is too small for task {task!r}: it needs more than "
            f"{length - budget} tokens before any context"
        )
    context = _fit(draft, tokenizer, budget, task, length)
    return RulerSample(
        task=task,
        index=index,
        context=context,
        question=draft.question,
        answer_prefix=draft.answer_prefix,
        references=draft.references,
        max_new_tokens=spec.max_new_tokens,
        metric=spec.metric,
    )

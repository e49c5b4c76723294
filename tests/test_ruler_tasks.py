"""RULER-style tasks: sentence splitting, local text, deterministic samples whose references
are in their contexts, token lengths, and scoring."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from eval.needle import default_haystack_dir
from eval.ruler_scoring import score, task_average
from eval.ruler_tasks import TASKS, RulerSample, make_sample
from eval.ruler_text import RulerText, haystack_sentences, split_sentences, word_list
from smartkv_jax.convert import load_tokenizer
from smartkv_jax.data import encode

NEEDLE_RE = re.compile(r"One special magic (?:number|UUID) for (\S+) is: (\S+)\.")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("smollm2")


@pytest.fixture(scope="module")
def text():
    return RulerText.load()


@pytest.fixture(scope="module")
def samples(tok, text):
    """Sample 0 of every task at 4096 and 8192 tokens, made once."""
    return {(t, n): make_sample(t, tok, n, 0, 0, text) for t in TASKS for n in (4096, 8192)}


def total_tokens(tok, s: RulerSample, reserve: int = 0) -> int:
    parts = (s.context, s.question, s.answer_prefix)
    return sum(len(encode(tok, p)) for p in parts) + s.max_new_tokens + reserve


# ----------------------------------------------------------------------------- text


@pytest.mark.parametrize(
    "raw, expected",
    [
        (
            "Mr. Smith met Dr. J. R. Watson on Baker St. near noon. It cost $4.50 today.",
            ["Mr. Smith met Dr. J. R. Watson on Baker St. near noon.", "It cost $4.50 today."],
        ),
        (
            '"What is his name?" "Bingley." "Oh!" cried she. He left.',
            ['"What is his name?"', '"Bingley."', '"Oh!" cried she.', "He left."],
        ),
        (
            "It is a truth universally\nacknowledged, that a single man\n\nmust want a wife.  "
            "See No. 5 and e.g. Paris, pi is 3.14. Done",
            [
                "It is a truth universally acknowledged, that a single man must want a wife.",
                "See No. 5 and e.g. Paris, pi is 3.14.",
                "Done",
            ],
        ),
        (
            "It was accelerating.We wouldn't stop it. In the last 40.The next one. "
            "[1]No one doubts it (really.) Then U.S. Steel rose.",
            [
                "It was accelerating.",
                "We wouldn't stop it.",
                "In the last 40.",
                "The next one.",
                "[1]No one doubts it (really.)",
                "Then U.S. Steel rose.",
            ],
        ),
    ],
)
def test_split_sentences(raw, expected):
    assert split_sentences(raw) == expected


def test_default_essays_are_installed():
    essays = sorted(default_haystack_dir().glob("*.txt"))
    assert len(essays) >= 10
    sentences = haystack_sentences()
    assert len(sentences) > 1000 and all(s == s.strip() and "\n" not in s for s in sentences)


def test_word_list_from_books(text):
    words = word_list()
    assert words == text.words and list(words) == sorted(set(words))
    assert len(words) > 3000
    assert all(w.isalpha() and w.islower() and 4 <= len(w) <= 10 for w in words)
    assert "that" not in words and "with" not in words  # the most frequent 1% dropped


def test_any_txt_directory_works(tmp_path, tok):
    essays, books = tmp_path / "essays", tmp_path / "books"
    essays.mkdir(), books.mkdir()
    (essays / "b.txt").write_text("Zebras hum quietly.\nThey hum at\nnight. ")
    (essays / "a.txt").write_text("Quokkas smile often. Mr. Quokka smiles most.")
    assert haystack_sentences(essays) == [
        "Quokkas smile often.",
        "Mr. Quokka smiles most.",
        "Zebras hum quietly.",
        "They hum at night.",
    ]
    assert haystack_sentences(essays / "b.txt") == ["Zebras hum quietly.", "They hum at night."]
    vocab = [f"{a}{b}ora" for a in "bcdfg" for b in "aeiou"]  # 25 words of 5 letters
    lines = [f"The {vocab[i % 25]} met the {vocab[(7 * i) % 25]} now." for i in range(400)]
    (books / "book.txt").write_text("\n".join(lines))
    text = RulerText.load(essays=essays, books=books)
    assert set(text.words) <= set(vocab) and len(text.words) >= 20
    s = make_sample("niah_single_2", tok, 1024, 0, 0, text)
    assert "Quokkas smile often." in s.context and "Zebras hum quietly." in s.context
    assert 0.97 * 1024 <= total_tokens(tok, s) <= 1024
    qa = make_sample("qa", tok, 1024, 0, 0, text)
    assert "Document 1:" in qa.context and "met the" in qa.context
    with pytest.raises(ValueError, match="too long for task 'cwe'"):
        make_sample("cwe", tok, 8192, 0, 0, text)


def test_bad_text_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        haystack_sentences(tmp_path / "missing")
    (tmp_path / "tiny.txt").write_text("Only a few words here, really.")
    with pytest.raises(ValueError, match="tiny.txt give 0 words"):
        RulerText.load(books=tmp_path / "tiny.txt")


# ----------------------------------------------------------------------------- samples


def test_samples_are_deterministic(tok, text, samples):
    for task in ("niah_multikey_2", "vt", "cwe", "fwe", "qa"):
        again = make_sample(task, tok, 4096, 0, 0, text)
        assert again == samples[(task, 4096)]
        assert make_sample(task, tok, 4096, 0, 1, text).context != again.context
        assert make_sample(task, tok, 4096, 1, 0, text).context != again.context
    for task in ("niah_single_3", "niah_multiquery"):  # references drawn afresh
        one, two = (make_sample(task, tok, 2048, 0, i, text).references for i in (0, 1))
        assert one != two


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("length", [4096, 8192])
def test_length_within_bounds(tok, samples, task, length):
    s = samples[(task, length)]
    assert s.task == task and s.index == 0
    assert 0.97 * length <= total_tokens(tok, s) <= length


def test_reserve_and_a_long_sample(tok, text):
    s = make_sample("niah_multivalue", tok, 4096, 3, 2, text, reserve=300)
    assert 0.97 * 4096 <= total_tokens(tok, s, reserve=300) <= 4096
    long = make_sample("niah_single_2", tok, 16384, 0, 0, text)
    assert 0.97 * 16384 <= total_tokens(tok, long) <= 16384
    assert long.context.count(long.references[0]) == 1


def test_task_settings(samples):
    expected = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50, "qa": 32}
    for (task, _), s in samples.items():
        assert s.max_new_tokens == expected[task.split("_")[0]]
        assert s.metric == ("any" if task == "qa" else "all")


@pytest.mark.parametrize("task", [t for t in TASKS if t.startswith("niah")])
def test_niah_values_sit_next_to_their_keys(samples, task):
    s = samples[(task, 4096)]
    needles = NEEDLE_RE.findall(s.context)
    by_key: dict[str, list[str]] = {}
    for key, value in needles:
        by_key.setdefault(key, []).append(value)
    queried = [k for k in by_key if k in s.question]
    assert set(s.references) == {v for k in queried for v in by_key[k]}
    n_refs = {"niah_multivalue": 4, "niah_multiquery": 4}.get(task, 1)
    assert len(s.references) == len(set(s.references)) == n_refs
    assert all(s.context.count(ref) == 1 for ref in s.references)
    if task == "niah_multikey_1":
        assert len(needles) == 4 and len(queried) == 1
    if task in ("niah_multikey_2", "niah_multikey_3"):
        assert len(needles) > 40 and len(queried) == 1
    if task == "niah_multikey_3":
        assert re.fullmatch(r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", s.references[0])
    assert ("The grass is green." in s.context) == (task == "niah_single_1")


def test_needle_depths_spread(tok, text):
    depths = []
    for index in range(8):
        s = make_sample("niah_single_1", tok, 1024, 0, index, text)
        depths.append(s.context.index(s.references[0]) / len(s.context))
    assert min(depths) < 0.35 and max(depths) > 0.65


def test_vt_chain_resolves_to_the_references(samples):
    s = samples[("vt", 4096)]
    value = re.search(r"the value (\d+)", s.question).group(1)
    assigned = dict(re.findall(r"^VAR ([A-Z]{5}) = (\d+|VAR [A-Z]{5})$", s.context, re.M))
    assert len(assigned) == 5

    def resolve(var: str) -> str:
        rhs = assigned[var]
        return resolve(rhs[4:]) if rhs.startswith("VAR ") else rhs

    assert {v for v in assigned if resolve(v) == value} == set(s.references)
    order = [s.context.index(f"VAR {v} =") for v in s.references]
    assert order == sorted(order)  # every assignment comes after the one it reads


def test_cwe_references_are_the_most_common(samples):
    for length in (4096, 8192):
        s = samples[("cwe", length)]
        items = re.findall(r"(\d+)\. ([a-z]+)", s.context)
        assert [int(i) for i, _ in items] == list(range(1, len(items) + 1))
        counts = Counter(w for _, w in items)
        top = counts.most_common()
        assert {w for w, _ in top[:10]} == set(s.references)
        assert {c for _, c in top[:10]} == {30} and top[10][1] == 3


def test_fwe_references_are_the_most_frequent(samples):
    for length in (4096, 8192):
        s = samples[("fwe", length)]
        counts = Counter(s.context.split("\n")[-1].split())
        dots = counts.pop("....")
        top = counts.most_common()
        assert tuple(w for w, _ in top[:3]) == s.references
        assert dots > top[0][1] > top[1][1] > top[2][1] > top[3][1]


def test_qa_fact_answers_the_question(samples):
    s = samples[("qa", 4096)]
    facts = re.findall(r"In (\d{4}), (\w+ \w+) hid the ([\w ]+?) in the ([\w ]+?)\.", s.context)
    assert len(facts) == 4
    asked = [f for f in facts if sum(part in s.question for part in f) == 2]
    assert len(asked) == 1
    assert s.references[0] in asked[0]
    assert all(r in s.references[0] for r in s.references[1:])
    assert s.question.rstrip().endswith("?") and s.answer_prefix == " Answer:"


def test_bad_requests(tok, text):
    with pytest.raises(ValueError, match="unknown RULER task 'niah_single_9'"):
        make_sample("niah_single_9", tok, 4096, 0, 0, text)
    with pytest.raises(ValueError, match="length 150 is too small for task 'niah_single_2'"):
        make_sample("niah_single_2", tok, 150, 0, 0, text)
    with pytest.raises(ValueError, match="length 200 is too small for task 'fwe'"):
        make_sample("fwe", tok, 200, 0, 0, text)  # the counts of ranks 4 and 5 would tie
    with pytest.raises(ValueError, match="length 300 is too small for task 'cwe'"):
        make_sample("cwe", tok, 300, 0, 0, text)
    with pytest.raises(ValueError, match="seed must be >= 0"):
        make_sample("vt", tok, 4096, -1, 0, text)


# ----------------------------------------------------------------------------- scoring


def test_scores():
    base = dict(task="t", index=0, context="", question="", answer_prefix="", max_new_tokens=8)
    every = RulerSample(references=("1234567", "Alpha", "beta", "9"), metric="all", **base)
    assert score("alpha 1234567 and nothing", every) == 50.0
    assert score("BETA alpha 91234567", every) == 100.0
    assert score("123456", every) == 0.0
    anyone = RulerSample(references=("bell tower", "tower"), metric="any", **base)
    assert score("The TOWER.", anyone) == 100.0 and score("the bell", anyone) == 0.0
    assert task_average([100.0, 50.0, 0.0, 25.0]) == 43.75
    with pytest.raises(ValueError, match="unknown metric 'some'"):
        score("x", RulerSample(references=("x",), metric="some", **base))
    with pytest.raises(ValueError, match="scores is empty"):
        task_average([])

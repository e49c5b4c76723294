"""Text sources: local directories of .txt files (the shared books by default), and the token
helpers that place sentences in them (needle prompts, label windows with facts)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_TEXT_DIR = Path(
    os.environ.get(
        "SMARTKV_TEXT_DIR", Path(__file__).resolve().parents[2] / "shared/data/gutenberg"
    )
)


def text_files(source: str | os.PathLike | None = None) -> list[Path]:
    """The .txt files of a directory (sorted), or a single file; the shared books by default."""
    path = Path(source) if source is not None else DEFAULT_TEXT_DIR
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(
            f"text source {path} does not exist; pass a directory of .txt files or a file "
            "(or set SMARTKV_TEXT_DIR)"
        )
    files = sorted(p for p in path.glob("*.txt") if p.is_file())
    if not files:
        raise FileNotFoundError(f"{path} holds no .txt files")
    return files


def read_text(path: Path) -> str:
    """A text file's contents (UTF-8; undecodable bytes replaced)."""
    return path.read_text(encoding="utf-8", errors="replace")


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` without special tokens added (BOS/EOS)."""
    try:
        return list(tokenizer(text, add_special_tokens=False).input_ids)
    except TypeError:
        return list(tokenizer(text).input_ids)


def token_texts(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Each token decoded on its own."""
    if hasattr(tokenizer, "batch_decode"):
        return list(tokenizer.batch_decode([[int(i)] for i in ids]))
    return [tokenizer.decode([int(i)]) for i in ids]


def sentence_starts(tokenizer: Any, ids: Sequence[int], newlines: bool = True) -> np.ndarray:
    """Indices j in 0..len(ids) (sorted, int) where a sentence may start: 0 and every j whose
    previous token ends with ., ! or ? (closing quotes allowed) or, with `newlines`, a newline
    (pass False for hard-wrapped text such as Gutenberg books)."""
    texts = token_texts(tokenizer, ids)
    starts = [0]
    for j in range(1, len(ids) + 1):
        prev = texts[j - 1]
        core = prev.rstrip(" \t").rstrip("\"'\u201d\u2019)")
        if (newlines and prev.endswith("\n")) or core.endswith((".", "!", "?")):
            starts.append(j)
    return np.asarray(starts, np.int64)

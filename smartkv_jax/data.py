"""Text sources: local directories of .txt files (the shared books by default)."""

from __future__ import annotations

import os
from pathlib import Path

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

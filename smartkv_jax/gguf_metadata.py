"""A GGUF file's transformers config and tokenizer, parsed once and kept as ordinary files.

transformers reads both by parsing the whole GGUF in Python (about 20 s each for Gemma 3's
262k-token vocabulary). The first load saves them (config.json, tokenizer files) under
`$SMARTKV_CACHE/gguf-meta/<name>-<size>-<mtime>/`, written under a temporary name and
renamed when complete; later loads read those. A changed file (another size or time) gets
a new entry; an unreadable entry is parsed again from the GGUF, never trusted."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from .checkpoint_files import CheckpointError
from .packaged_models import cache_dir


def transformers_load(load: Callable[[], object], where: str | Path, what: str):
    """`load()` (an AutoConfig / AutoTokenizer call); its errors as CheckpointError naming
    `where` and `what` it was reading."""
    try:
        return load()
    except ImportError:
        raise
    except Exception as err:  # transformers raises assorted errors on files it rejects
        raise CheckpointError(
            f"{where}: transformers cannot read {what}: {type(err).__name__}: {err}"
        ) from err


def _entry(path: Path) -> Path:
    stat = path.stat()
    return cache_dir() / "gguf-meta" / f"{path.name}-{stat.st_size}-{int(stat.st_mtime)}"


def _from_entry(entry: Path):
    """(config, tokenizer) saved in `entry`, or None if it is absent or unreadable."""
    from transformers import AutoConfig, AutoTokenizer

    if not (entry / "config.json").is_file():
        return None
    try:
        return AutoConfig.from_pretrained(str(entry)), AutoTokenizer.from_pretrained(str(entry))
    except Exception:  # a damaged entry: parse the GGUF again
        return None


def _save_entry(entry: Path, config, tokenizer) -> None:
    """Save both under a temporary name, then rename; a cache that cannot be written is
    skipped (the next load parses the GGUF again)."""
    partial = entry.with_name(f"{entry.name}.partial-{os.getpid()}")
    try:
        config.save_pretrained(str(partial))
        tokenizer.save_pretrained(str(partial))
        os.replace(partial, entry)
    except OSError:
        pass
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def gguf_config_and_tokenizer(path: Path):
    """(transformers config, tokenizer) of a GGUF file, from the cache when it holds them."""
    from transformers import AutoConfig, AutoTokenizer

    entry = _entry(path)
    cached = _from_entry(entry)
    if cached is not None:
        return cached
    folder, name = str(path.parent), path.name
    config = transformers_load(
        lambda: AutoConfig.from_pretrained(folder, gguf_file=name), path, "its model config"
    )
    tokenizer = transformers_load(
        lambda: AutoTokenizer.from_pretrained(folder, gguf_file=name), path, "its tokenizer"
    )
    _save_entry(entry, config, tokenizer)
    return config, tokenizer

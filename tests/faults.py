"""Helpers of the fault tests (test_faults_files.py, test_faults_labels.py) and of
test_labels_distributed.py: file snapshots, truncation, error assertions, label store
comparison and a tiny transformers model directory with a tokenizer."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from train.label_store import open_store

from .conftest import tiny_hf_config
from .label_stores import CAP, TAUS, D, K, L


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` (or `root` itself) by relative path, with its bytes."""
    if root.is_file():
        return {root.name: root.read_bytes()}
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def cut(path: Path, keep: float = 0.5) -> None:
    """Truncate a file to `keep` of its bytes."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def fails(call, error, *patterns: str, names: Path | str | None = None) -> str:
    """Assert `call()` raises `error` whose message matches every pattern and names `names`."""
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    for pattern in patterns:
        assert re.search(pattern, message), (pattern, message)
    if names is not None:
        assert str(names) in message, message
    return message


WORDS = [f"w{i}" for i in range(90)]


def assert_same_store(a: Path, b: Path) -> None:
    """Label stores `a` and `b` hold the same rows in the same order (every column) and the
    same metadata but for the labelling speed."""
    import datasets

    sa, sb = open_store(a, in_memory=True), open_store(b, in_memory=True)
    for name in ("keys_NLKD", "lifespan_NTLK", "censored_N", "pos_N"):
        np.testing.assert_array_equal(getattr(sa, name), getattr(sb, name))
    for column in ("doc", "window"):
        assert (
            datasets.load_from_disk(str(a / "data"))[column]
            == datasets.load_from_disk(str(b / "data"))[column]
        )
    timing = {"tokens_per_s"}
    assert {k: v for k, v in sa.meta.items() if k not in timing} == {
        k: v for k, v in sb.meta.items() if k not in timing
    }


def save_tokenizer(path: Path) -> None:
    """A word-level tokenizer over WORDS (ids 1..90, 0 unknown), saved as transformers does."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)


def save_tiny_model(path: Path) -> Path:
    """A tiny random llama (config.json + model.safetensors) with a tokenizer, in `path`."""
    torch = pytest.importorskip("torch")
    import transformers

    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(tiny_hf_config()).save_pretrained(path)
    save_tokenizer(path)
    return path


STORE_META = {
    "model": "m",
    "taus": list(TAUS),
    "cap": CAP,
    "num_layers": L,
    "num_kv_heads": K,
    "head_dim": D,
}


def store_window(keys: np.ndarray) -> dict[str, np.ndarray]:
    """One window's labels for `StoreWriter.add_window` around the given keys [T, L, K, D]."""
    pos = np.arange(len(keys), dtype=np.int32)
    life = np.ones((len(keys), len(TAUS), L, K), np.int32)
    return {"key": keys, "lifespan": life, "censored": pos > 2, "pos": pos}

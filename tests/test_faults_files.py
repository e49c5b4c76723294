"""Damaged and wrong input files fail with an error that names the file and the problem, and
the file is left as it was: label stores (metadata.json, Arrow data, NaN keys), GGUF files,
safetensors, config.json and policy tables."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from smartkv_jax.config import UnsupportedArchitectureError, read_model_config
from smartkv_jax.convert import CheckpointError, load_gguf, load_hf_dir
from smartkv_jax.errors import InputFileError
from smartkv_jax.policy_table import PolicyConfig
from train.label_store import StoreWriter, open_store, partial_dir

from .conftest import tiny_hf_config
from .faults import (
    STORE_META,
    cut,
    fails,
    snapshot,
    store_window,
)
from .label_stores import TAUS, D, K, L, T, make_store

# ----------------------------------------------------------------------------- label stores


def _edit_meta(store: Path, change) -> None:
    meta = json.loads((store / "metadata.json").read_text())
    change(meta)
    (store / "metadata.json").write_text(json.dumps(meta))


def _arrow(store: Path) -> Path:
    return next((store / "data").glob("*.arrow"))


STORE_FAULTS = {
    "metadata missing": (
        lambda s: (s / "metadata.json").unlink(),
        FileNotFoundError,
        ["not a label store \\(no metadata.json"],
    ),
    "metadata empty": (
        lambda s: (s / "metadata.json").write_text(""),
        InputFileError,
        ["metadata.json is empty"],
    ),
    "metadata garbled": (
        lambda s: (s / "metadata.json").write_bytes(b"\x89PNG\x00\xff"),
        InputFileError,
        ["metadata.json is not a text file"],
    ),
    "metadata truncated": (
        lambda s: cut(s / "metadata.json"),
        InputFileError,
        ["metadata.json is not valid JSON", "truncated"],
    ),
    "metadata a list": (
        lambda s: (s / "metadata.json").write_text("[1, 2]"),
        InputFileError,
        ["holds a list, expected an object with keys model, taus"],
    ),
    "metadata without cap": (
        lambda s: _edit_meta(s, lambda m: m.pop("cap")),
        InputFileError,
        ["has no 'cap' \\(required keys: model, taus, cap, num_layers"],
    ),
    "metadata misspelt key": (
        lambda s: _edit_meta(s, lambda m: m.update(tau=m.pop("taus"))),
        InputFileError,
        ["has no 'taus'", "it has: .*tau,", "did you mean 'taus' for 'tau'\\?"],
    ),
    "metadata wrong value": (
        lambda s: _edit_meta(s, lambda m: m.update(cap="big")),
        InputFileError,
        ["cap must be a positive integer, got 'big'"],
    ),
    "metadata of a policy table": (
        lambda s: (s / "metadata.json").write_text(PolicyConfig.uniform(2).to_json()),
        InputFileError,
        ["has no 'model', 'taus', 'cap'"],
    ),
    "data missing": (
        lambda s: shutil.rmtree(s / "data"),
        InputFileError,
        ["data/ is missing"],
    ),
    "arrow truncated": (
        lambda s: cut(_arrow(s), 0.6),
        InputFileError,
        ["cannot read data/ \\(truncated or damaged|holds \\d+ rows"],
    ),
    "arrow empty": (
        lambda s: _arrow(s).write_bytes(b""),
        InputFileError,
        ["cannot read data/"],
    ),
    "arrow garbled": (
        lambda s: _arrow(s).write_bytes(np.random.default_rng(0).bytes(5000)),
        InputFileError,
        ["cannot read data/"],
    ),
    "arrow rows missing": (
        lambda s: _edit_meta(s, lambda m: m.update(n_windows=3)),
        InputFileError,
        [f"data/ holds {2 * T} rows, metadata.json promises {3 * T}"],
    ),
}


@pytest.mark.parametrize("case", sorted(STORE_FAULTS))
def test_damaged_label_store_is_named_and_left_alone(tmp_path, case):
    damage, error, patterns = STORE_FAULTS[case]
    store = make_store(tmp_path / "store", n_windows=2, seed=0)
    damage(store)
    before = snapshot(store)
    fails(lambda: open_store(store), error, *patterns, names=store)
    assert snapshot(store) == before


def test_store_paths_that_are_no_store(tmp_path):
    store = make_store(tmp_path / "store", n_windows=1, seed=0)
    fails(lambda: open_store(store / "metadata.json"), InputFileError, "is a file", names=store)
    fails(lambda: open_store(tmp_path / "nope"), FileNotFoundError, "does not exist")
    partial_dir(tmp_path / "nope").mkdir()
    fails(lambda: open_store(tmp_path / "nope"), FileNotFoundError, "unfinished `smartkv labels`")


def test_nan_keys_are_refused_on_open(tmp_path):
    keys = np.ones((4, L, K, D), np.float32)
    keys[1, 0, 0, 3], keys[3, 1, 2, 0] = np.nan, np.inf
    writer = StoreWriter(L, K, D, len(TAUS))
    writer.add_window(store_window(keys), "a.txt", 0)
    writer.write(tmp_path / "s", STORE_META)
    fails(
        lambda: open_store(tmp_path / "s"),
        InputFileError,
        "2 of 4 rows have NaN or infinite keys \\(the first is row 1\\)",
        names=tmp_path / "s",
    )


# ----------------------------------------------------------------------------- GGUF files


def _gguf(path: Path, arch: str = "llama") -> Path:
    """A small well-formed GGUF file: one float tensor, no model settings."""
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.arange(4 * 64, dtype=np.float32).reshape(4, 64))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


GGUF_FAULTS = {
    "empty": (lambda p: p.write_bytes(b""), CheckpointError, ["GGUF file .* is empty"]),
    "not gguf": (
        lambda p: p.write_text("hello, world"),
        CheckpointError,
        ["is not a GGUF file: it starts with b'hell', a GGUF file with b'GGUF'"],
    ),
    "garbled": (
        lambda p: p.write_bytes(b"GGUF" + np.random.default_rng(0).bytes(300)),
        CheckpointError,
        ["is not a readable GGUF file \\(304 bytes; truncated or damaged\\)"],
    ),
    "truncated": (
        lambda p: cut(_gguf(p), 0.7),
        CheckpointError,
        ["truncated"],
    ),
    "unsupported architecture": (
        lambda p: _gguf(p, "gpt2"),
        UnsupportedArchitectureError,
        ["architecture 'gpt2' is not supported; supported: llama, mistral, qwen2"],
    ),
    "no model settings": (
        lambda p: _gguf(p),
        CheckpointError,
        ["has no llama.embedding_length, llama.feed_forward_length, llama.attention.head_count"],
    ),
}


@pytest.mark.parametrize("case", sorted(GGUF_FAULTS))
def test_damaged_gguf_is_named(tmp_path, case):
    damage, error, patterns = GGUF_FAULTS[case]
    path = tmp_path / "model.gguf"
    damage(path)
    before = snapshot(path)
    fails(lambda: load_gguf(path), error, *patterns, names=path)
    assert snapshot(path) == before


def test_gguf_paths_that_are_no_file(tmp_path):
    fails(lambda: load_gguf(tmp_path), CheckpointError, "is a directory", names=tmp_path)
    fails(lambda: load_gguf(tmp_path / "x.gguf"), FileNotFoundError, "GGUF file not found")


# ----------------------------------------------------------------------------- safetensors


def _st(model_dir: Path) -> Path:
    return next(model_dir.glob("*.safetensors"))


def _replace_tensor(model_dir: Path, name: str, array: np.ndarray) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(_st(model_dir))
    tensors[name] = array
    save_file(tensors, _st(model_dir))


def _garble_header(model_dir: Path) -> None:
    data = _st(model_dir).read_bytes()
    n = int.from_bytes(data[:8], "little")
    _st(model_dir).write_bytes(data[:8] + b"\xff" * n + data[8 + n :])


Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
SAFETENSORS_FAULTS = {
    "empty": (lambda d: _st(d).write_bytes(b""), ["0 bytes, too short for a safetensors file"]),
    "truncated": (
        lambda d: cut(_st(d), 0.8),
        ["truncated: its tensors end at byte \\d+, the file has \\d+"],
    ),
    "header cut": (
        lambda d: cut(_st(d), 0.0005),
        ["not a safetensors file, or truncated: its first 8 bytes give a header of \\d+ bytes"],
    ),
    "garbled header": (_garble_header, ["not a safetensors file \\(its header is not JSON\\)"]),
    "not safetensors": (
        lambda d: _st(d).write_text("not a safetensors file at all"),
        ["not a safetensors file, or truncated"],
    ),
    "integer weights": (
        lambda d: _replace_tensor(d, Q_PROJ, np.zeros((64, 64), np.int64)),
        ["tensor '.*q_proj.weight' has dtype I64; weights must be F16, BF16, F32, F64"],
    ),
    "wrong shape": (
        lambda d: _replace_tensor(d, Q_PROJ, np.zeros((3, 3), np.float32)),
        ["tensor '.*q_proj.weight' has shape \\(3, 3\\) \\(after layout change\\), expected"],
    ),
    "missing shard": (
        lambda d: (d / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {Q_PROJ: "model-00002-of-00002.safetensors"}})
        ),
        ["names shards that are missing: model-00002-of-00002.safetensors"],
    ),
}


@pytest.mark.parametrize("case", sorted(SAFETENSORS_FAULTS))
def test_damaged_safetensors_are_named(tmp_path, hf_model_dir, case):
    damage, patterns = SAFETENSORS_FAULTS[case]
    model_dir = shutil.copytree(hf_model_dir, tmp_path / "model")
    damage(model_dir)
    before = snapshot(model_dir)
    fails(lambda: load_hf_dir(model_dir), CheckpointError, *patterns, names=model_dir)
    assert snapshot(model_dir) == before


# ----------------------------------------------------------------------------- config.json


def _config(change) -> str:
    data = tiny_hf_config().to_dict()
    change(data)
    return json.dumps(data)


CONFIG_FAULTS = {
    "empty": ("", InputFileError, ["config.json is empty"]),
    "garbled": ("model_type = llama\n", InputFileError, ["config.json is not valid JSON"]),
    "truncated": (_config(lambda c: None)[:60], InputFileError, ["not valid JSON", "truncated"]),
    "a list": ("[]", InputFileError, ["holds a list, expected an object with keys model_type"]),
    "gpt2": (
        _config(lambda c: c.update(model_type="gpt2")),
        UnsupportedArchitectureError,
        ["model_type 'gpt2' is not supported; supported: llama, mistral, qwen2"],
    ),
    "no model_type": (
        _config(lambda c: c.pop("model_type")),
        UnsupportedArchitectureError,
        ["model_type None is not supported"],
    ),
    "no hidden_size": (
        _config(lambda c: c.pop("hidden_size")),
        InputFileError,
        ["has no 'hidden_size' \\(required keys: vocab_size, hidden_size"],
    ),
    "hidden_size a string": (
        _config(lambda c: c.update(hidden_size="64")),
        InputFileError,
        ["hidden_size must be a positive integer, got '64'"],
    ),
    "kv heads do not divide": (
        _config(lambda c: c.update(num_key_value_heads=3)),
        InputFileError,
        ["num_heads=4 is not a multiple of num_kv_heads=3|num_key_value_heads"],
    ),
}


@pytest.mark.parametrize("case", sorted(CONFIG_FAULTS))
def test_damaged_config_json_is_named(tmp_path, case):
    text, error, patterns = CONFIG_FAULTS[case]
    (tmp_path / "config.json").write_text(text)
    fails(lambda: read_model_config(tmp_path), error, *patterns, names=tmp_path / "config.json")
    assert (tmp_path / "config.json").read_text() == text


def test_missing_config_json(tmp_path):
    fails(lambda: load_hf_dir(tmp_path), FileNotFoundError, "config.json not found")


# ----------------------------------------------------------------------------- policy tables


def _table(*rows: dict, **top) -> str:
    return json.dumps({"name": "t", "layers": list(rows), **top})


FULL = {"layers": "0-2", "kind": "full"}
POLICY_FAULTS = {
    "empty": ("", ["is empty"]),
    "garbled": ("{layers: [", ["is not valid JSON"]),
    "truncated": (_table(FULL)[:25], ["is not valid JSON", "truncated"]),
    "a list": ("[]", ["holds a list, expected an object with keys name, layers"]),
    "misspelt layers": (
        json.dumps({"name": "t", "layer": [FULL]}),
        ["has no 'layers' \\(required keys: layers, optional: name; it has: layer, name\\)"],
    ),
    "unknown top key": (
        _table(FULL, nmae="x"),
        ["unknown key 'nmae'; valid keys: name, layers; did you mean 'name' for 'nmae'\\?"],
    ),
    "row without layers": (_table({"kind": "full"}), ["row 0 has no 'layers'"]),
    "misspelt setting": (
        _table({"layers": "0-2", "kind": "window", "capacty": 36}),
        ["row 0: policy 'window' has no setting 'capacty'; valid: kind, capacity, n_sink"],
    ),
    "unknown kind": (_table({"layers": "0-2", "kind": "windw"}), ["row 0: unknown policy"]),
    "capacity a string": (
        _table({"layers": "0-2", "kind": "window", "capacity": "36"}),
        ["setting 'capacity' must be an integer or null, got '36'"],
    ),
    "capacity zero": (
        _table({"layers": "0-2", "kind": "window", "capacity": 0}),
        ["capacity must be >= 1, got 0"],
    ),
    "range outside": (_table({"layers": "0-9", "kind": "full"}), ["range 0-9 is outside 0-2"]),
    "range garbled": (_table({"layers": "first-last"}), ["'layers' must be \"first-last\""]),
    "rows overlap": (
        _table({"layers": "0-1", "kind": "full"}, {"layers": "1-2", "kind": "full"}),
        ["layer 1 is in rows 0 and 1"],
    ),
    "gap": (_table({"layers": "0-1", "kind": "full"}), ["does not cover layers \\[2\\]"]),
    "row a string": (_table("full"), ["row 0 is a string, expected an object"]),
}


@pytest.mark.parametrize("case", sorted(POLICY_FAULTS))
def test_bad_policy_table_is_named(tmp_path, case):
    text, patterns = POLICY_FAULTS[case]
    path = tmp_path / "table.json"
    path.write_text(text)
    fails(lambda: PolicyConfig.from_file(path, 3), InputFileError, *patterns, names=path)
    assert path.read_text() == text


def test_policy_table_files_that_are_no_table(tmp_path):
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe{}")
    fails(lambda: PolicyConfig.from_file(tmp_path / "bin.json", 3), InputFileError, "not a text")
    fails(lambda: PolicyConfig.from_file(tmp_path, 3), InputFileError, "is a directory")
    fails(lambda: PolicyConfig.from_file(tmp_path / "no.json", 3), FileNotFoundError, "no.json")

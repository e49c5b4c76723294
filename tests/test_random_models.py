"""Known model shapes with random weights (`--model random:NAME`), generate's compile time
apart from prefill, and `smartkv generate --prompt-file / --token-ids`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from smartkv_cli.flags import MODEL_HELP
from smartkv_cli.main import main
from smartkv_jax.cache import init_cache
from smartkv_jax.convert import expected_shapes, load_model
from smartkv_jax.errors import SmartKVError
from smartkv_jax.generate import generate, prefill
from smartkv_jax.model_shapes import MODEL_SHAPES, model_shape, random_model
from smartkv_jax.policy_table import PolicyConfig

# parameter counts of the public checkpoints (Gemma 3 4B: its text decoder, without the
# vision tower), as the model cards and safetensors indexes give them
PARAMS = {
    "llama-3.1-8b": 8.030e9,
    "llama-3.2-1b": 1.236e9,
    "qwen3-8b": 8.191e9,
    "qwen2.5-0.5b": 0.494e9,
    "gemma3-4b": 3.880e9,
    "smollm2-135m": 1.345e8,
}
TINY = "smollm2-135m"  # shrunk to 2 layers for the runs below
TINY_CLI = ["--model", f"random:{TINY}", "--dtype", "bfloat16", "--max-new-tokens", "4"]


@pytest.mark.parametrize("name", sorted(MODEL_SHAPES))
def test_parameter_counts_from_shapes(name):
    shapes = expected_shapes(model_shape(name))  # shapes only, nothing allocated
    assert sum(math.prod(s) for s in shapes.values()) == pytest.approx(PARAMS[name], rel=1e-3)


def test_family_details():
    llama = model_shape("llama-3.1-8b")
    assert (llama.rope_scaling.kind, llama.rope_scaling.factor, llama.group_size) == (
        "llama3",
        8.0,
        4,
    )
    assert model_shape("llama-3.2-1b").tie_embeddings
    assert model_shape("qwen2.5-0.5b").qkv_bias and model_shape("qwen3-8b").qk_norm
    gemma = model_shape("gemma3-4b")
    assert gemma.sliding_layers == tuple(i for i in range(34) if i not in (5, 11, 17, 23, 29))
    assert set(gemma.layer_windows) == {0, 1024}
    assert (gemma.local_rope_theta, gemma.rope_theta, gemma.scale) == (1e4, 1e6, 1 / 16)
    assert gemma.rope_scaling.kind == "linear" and gemma.rope_scaling.factor == 8.0
    assert gemma.norm_plus_one and gemma.sandwich_norms and gemma.embed_scale
    # shrinking keeps the first layers' windows
    assert model_shape("gemma3-4b", num_layers=6).layer_windows == (1024,) * 5 + (0,)


def test_model_help_names_every_shape():
    assert all(name in MODEL_HELP for name in MODEL_SHAPES)


def test_unknown_name_is_one_line():
    with pytest.raises(SmartKVError) as err:
        load_model("random:llama-9")
    text = str(err.value)
    assert "\n" not in text and "'llama-9'" in text
    assert all(f"random:{name}" in text for name in MODEL_SHAPES)


@pytest.fixture(scope="module")
def tiny():
    return random_model(TINY, jnp.bfloat16, num_layers=2)


def test_random_weights(tiny):
    layers = tiny.stacks[0].weights()
    assert tiny.dtype == jnp.bfloat16 and all(w.dtype == jnp.bfloat16 for w in layers.values())
    wq, wk = (np.asarray(layers[n], np.float32) for n in ("wq", "wk"))
    assert wq.shape == (2, 576, 576) and wk.shape == (2, 576, 192)
    assert 0.015 < wq.std() < 0.025 and len(np.unique(wq)) > 100
    assert not np.array_equal(wq[..., :192], wk)  # each weight drawn from its own key
    assert np.all(np.asarray(layers["attn_norm"], np.float32) == 1.0)
    gemma = random_model("gemma3-4b", jnp.float32, num_layers=2, vocab_size=64, hidden_size=32)
    assert np.all(np.asarray(gemma.final_norm[...]) == 0.0)  # applied as (1 + w)


def test_random_model_runs_and_compile_time_is_apart(tiny):
    prompt = [list(range(1, 41))]
    first = generate(tiny, prompt, 4, chunk=64, stop_tokens=())
    again = generate(tiny, prompt, 4, chunk=64, stop_tokens=())
    assert first.tokens == again.tokens and len(first.tokens[0]) == 4
    assert all(0 <= t < tiny.cfg.vocab_size for t in first.tokens[0])
    assert again.compile_s < first.compile_s / 5  # compiled once, on the first call
    assert first.prefill_s < first.compile_s  # ... and not timed as prefill
    policy = PolicyConfig.uniform(2).resolve(256, ())
    cache = init_cache(tiny.cfg, policy, 1, tiny.dtype)
    logits, cache, _ = prefill(tiny, policy, [prompt], cache, 64)
    assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
    assert cache.groups[0].k.dtype == jnp.bfloat16


@pytest.fixture
def tiny_cli(monkeypatch):
    """`--model random:smollm2-135m` loads a 2-layer model of that shape."""
    monkeypatch.setitem(MODEL_SHAPES, TINY, model_shape(TINY, num_layers=2))


def test_cli_token_ids_and_prompt_file(tiny_cli, tmp_path, capsys):
    ids = tmp_path / "ids.txt"
    ids.write_text(" ".join(str(i) for i in range(1, 41)) + "\n")
    argv = ["generate", *TINY_CLI, "--token-ids", "--prompt", "5 6 7", "--prompt-file", str(ids)]
    assert main([*argv, "--greedy"]) == 0
    out = capsys.readouterr().out
    assert "compile " in out and "prefill " in out and "decode " in out
    assert out.count("--- prompt:") == 2
    assert main([*argv, "--greedy", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["new_tokens"] == [4, 4] and report["compile_s"] >= 0
    assert all(w.isdigit() for c in report["completions"] for w in c.split())


def _one_line_error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    return err


def test_cli_random_model_without_token_ids(tiny_cli, capsys):
    err = _one_line_error(["generate", *TINY_CLI, "--prompt", "hello"], capsys)
    assert f"--model random:{TINY} has no tokenizer" in err and "--token-ids" in err
    err = _one_line_error(["generate", *TINY_CLI, "--token-ids", "--prompt", "1 x"], capsys)
    assert "--token-ids" in err and "'x'" in err
    err = _one_line_error(["generate", "--model", "random:gpt-5", "--prompt", "1"], capsys)
    assert "random:qwen3-8b" in err


def _garbled(p: Path) -> None:
    p.write_bytes(b"\xff\xfe\x00")


def _unreadable(p: Path, monkeypatch) -> None:
    p.write_text("fine")

    def refuse(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", refuse)


@pytest.mark.parametrize(
    "fault, says",
    [
        (lambda p, mp: None, "not found"),
        (lambda p, mp: p.write_text("  \n"), "is empty"),
        (lambda p, mp: _garbled(p), "is not a text file"),
        (lambda p, mp: p.mkdir(), "is a directory"),
        (_unreadable, "cannot be read: Permission denied"),
    ],
    ids=["missing", "empty", "not utf-8", "directory", "unreadable"],
)
def test_cli_bad_prompt_file(fault, says, tmp_path, capsys, monkeypatch):
    f = tmp_path / "prompt.txt"
    fault(f, monkeypatch)
    err = _one_line_error(["generate", *TINY_CLI, "--prompt-file", str(f)], capsys)
    assert f"--prompt-file {f}" in err and says in err


def test_cli_needs_a_prompt(capsys):
    err = _one_line_error(["generate", *TINY_CLI], capsys)
    assert "--prompt" in err and "--prompt-file" in err

"""Sharded inference (smartkv_jax/sharding.py): on 8 forced CPU devices, generation, the
prefill and exact perplexity on a ("data", "model") mesh equal the one-device runs, with the
weights and caches really split, the Pallas kernel path included; and the --mesh flag.

The device count must be set before jax starts, so the 8-device runs happen in subprocesses
(tests/sharded_runs.py, and the CLI). XLA's CPU backend optimisations are turned off there:
compiling SPMD programs for 8 devices otherwise dominates the runtime, and both sides of
every comparison run under the same flags.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from smartkv_cli.flags import mesh_arg, place_model
from smartkv_cli.main import main
from smartkv_jax import sharding as shd
from smartkv_jax.errors import SmartKVError
from smartkv_jax.model import Transformer

from .conftest import tiny_config
from .sharded_runs import CASES

REPO = Path(__file__).resolve().parents[1]
XLA_FLAGS = (
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
    "--xla_llvm_disable_expensive_passes=true"
)


def _run_8_devices(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "XLA_FLAGS": XLA_FLAGS, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


@pytest.fixture(scope="module")
def runs() -> dict:
    proc = _run_8_devices(["-m", "tests.sharded_runs"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _spec(spec: list, mesh: tuple[int, int]) -> list:
    """A spec with mesh axes of size 1 read as None (jit's outputs drop them)."""
    sizes = dict(zip(shd.AXES, mesh))
    return [None if a is None or sizes[a] == 1 else a for a in spec]


@pytest.mark.parametrize("name", list(CASES))
def test_sharded_matches_one_device(runs, name):
    assert runs["devices"] == 8
    case = runs["cases"][name]
    assert case["logits_diff"] < 1e-4
    assert case["prefilled"]["pos_equal"] and case["prefilled"]["k"] < 1e-4
    if CASES[name][4]:  # decoded too: the same greedy tokens and the same cache after them
        assert case["tokens"] == case["ref_tokens"] and len(case["tokens"][0]) > 1
        assert case["decoded"]["pos_equal"] and case["decoded"]["k"] < 1e-4
    if CASES[name][2] == "hybrid":  # the window layers held fewer slots than the prompts
        assert case["capacity"] < 40


# name: expected (wq, wk, cache k [L, B, K, S, D], logits [B, V]); B = 8 rows
EXPECTED_SPECS = {
    "full_8x1_k4": (
        [None, None, None],
        [None, None, None],
        [None, "data", None, None, None],
        ["data", None],
    ),
    "hybrid_2x4_k4": (
        [None, None, "model"],
        [None, None, "model"],
        [None, "data", "model", None, None],
        ["data", None],
    ),
    # 3 KV heads do not split over model=4: wk and the cache's K axis are replicated
    "hybrid_2x4_k3": (
        [None, None, "model"],
        [None, None, None],
        [None, "data", None, None, None],
        ["data", None],
    ),
    # 4 KV heads do not split over model=8; the 8 query heads do
    "hybrid_1x8_k4": (
        [None, None, "model"],
        [None, None, None],
        [None, None, None, None, None],
        [None, None],
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_weights_and_caches_are_on_the_mesh(runs, name):
    specs, mesh = runs["cases"][name]["specs"], CASES[name][3]
    wq, wk, cache_k, logits = EXPECTED_SPECS[name]
    assert _spec(specs["wq"], mesh) == wq and _spec(specs["wq_regrouped"], mesh) == wq
    assert _spec(specs["wk"], mesh) == wk
    assert _spec(specs["w_up"], mesh) == [None, None, "model" if mesh[1] > 1 else None]
    assert _spec(specs["cache_k"], mesh) == cache_k
    assert _spec(specs["logits"], mesh) == logits
    assert runs["cases"][name]["devices"] == {"cache_k": 8, "logits": 8}  # none fell back


def test_default_mesh_puts_every_device_on_data(runs):
    assert runs["default_mesh"] == [8, 1]


def test_exact_perplexity_sharded_matches_one_device(runs):
    ppl = runs["perplexity"]
    assert ppl["nll_diff"] < 1e-4 and 2.0 < ppl["nll"] < 6.0  # ~log(50): random weights
    assert ppl["k"] == [None, "data", "model", None, None]


@pytest.mark.parametrize("mesh", ["2x4", "1x8"])
def test_pallas_kernel_runs_per_shard_and_matches_one_device(runs, mesh):
    """On a TPU mesh the decode-attention kernel runs on each device's rows and heads
    (shard_map: once per layer group in the traced prefill step); 4 KV heads split over
    model=4 and are replicated over model=8."""
    run = runs["kernel"][mesh]
    assert run["wrapped"] >= 1
    assert run["logits_diff"] < 1e-4
    assert run["prefilled"]["pos_equal"] and run["prefilled"]["k"] < 1e-4


def test_mesh_flag_values():
    assert mesh_arg("2x4") == (2, 4) and mesh_arg("1X8") == (1, 8)
    for bad in ("2", "2x", "0x8", "2x4x1", "ax4", "-1x8"):
        with pytest.raises(Exception, match="DATAxMODEL"):
            mesh_arg(bad)


def test_bad_mesh_flag_is_one_line_naming_it(capsys):
    assert main(["generate", "--mesh", "2by4", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "argument --mesh: expected DATAxMODEL" in err


def test_place_model_on_one_device():
    model = Transformer.init_random(tiny_config(), jax.random.PRNGKey(0))
    assert place_model(model, None) is None  # the default with one device: nothing moves
    assert shd.model_mesh(model) is None
    with pytest.raises(SmartKVError, match=r"--mesh 2x4 needs 8 devices; this process has 1"):
        place_model(model, (2, 4))
    assert place_model(model, (1, 1)) == (1, 1)
    assert shd.mesh_shape(shd.model_mesh(model)) == (1, 1)


def test_cli_generate_on_a_mesh_matches_one_device(hf_model_dir, capsys):
    """`smartkv generate --mesh 2x4` on 8 devices gives the one-device completions."""
    argv = ["generate", "--model", str(hf_model_dir), "--greedy", "--max-new-tokens", "4"]
    argv += ["--prompt", "a b c", "--prompt", "d e f g h", "--json"]
    assert main(argv) == 0
    one_device = json.loads(capsys.readouterr().out)
    assert one_device["mesh"] is None
    proc = _run_8_devices(["-m", "smartkv_cli.main", *argv, "--mesh", "2x4"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["mesh"] == [2, 4] and report["completions"] == one_device["completions"]

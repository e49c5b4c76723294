"""The benchmark entry points at a tiny size: eval/bench_accelerator.py (and through it
eval/bench_case.py) runs real-shape models cut to 6 layers, reports what it names, and imports
nothing beyond what a bare accelerator install has."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from eval import bench_accelerator
from eval.bench_case import Case, case_model
from smartkv_jax.errors import SmartKVError
from smartkv_jax.jsonio import write_table_and_rows

# what `python -m eval.bench_accelerator` must run without (an accelerator host has JAX, flax,
# optax, orbax and transformers; the benchmark needs none of the last two either)
NOT_IMPORTED = ("torch", "transformers", "gguf", "datasets", "pandas", "matplotlib", "tqdm")

_RUN = """
import json, sys
from eval import bench_accelerator
from eval.bench_case import Case, case_model
from smartkv_jax.errors import SmartKVError
rows = bench_accelerator.main(sys.argv[1:])
print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))
"""


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    argv = ["--models", "smollm2-135m", "--contexts", "640", "--batches", "2"]
    argv += ["--layers", "6", "--new-tokens", "4", "--chunk", "128", "--dtype", "float32"]
    argv += ["--out", str(out)]
    res = subprocess.run(
        [sys.executable, "-c", _RUN, *argv], capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-2000:]
    modules = json.loads(res.stdout.strip().splitlines()[-1])
    return json.loads(out.read_text()), modules


def test_accelerator_benchmark_measures_every_case(tiny_run):
    report, _ = tiny_run
    cases = {(c["batch"], c["policy"]): c for c in report["cases"]}
    assert sorted(cases) == [(2, "full"), (2, "hybrid")]
    for c in cases.values():
        assert c["model"] == "random:smollm2-135m" and c["layers"] == 6 and c["context"] == 640
        assert c["prefill_s"] > 0 and c["compile_s"] > 0 and c["decode_tok_s"] > 0
        assert c["prefill_tok_s"] == pytest.approx(c["batch"] * 640 / c["prefill_s"])
        assert c["peak_bytes"] > c["kv_bytes"] > 0
        # on this CPU the peak counts from just before the case, not from the model's load
        assert c["peak_reset"] and c["peak_bytes"] >= c["resident_before_bytes"]
        # XLA's accounting of a prefill step: weights, the cache (keys and values, 512 bytes a
        # slot and head, plus 8 of position and score) and the step's own working memory
        assert c["cache_bytes"] * 512 == c["kv_bytes"] * 520 and c["prefill_temp_bytes"] > 0
        parts = c["weights_bytes"] + c["cache_bytes"] + c["prefill_temp_bytes"]
        assert c["step_bytes"] == parts
    full, hybrid = cases[(2, "full")], cases[(2, "hybrid")]
    # 6 layers x 3 KV heads x 64 dims x (k, v) x 4 bytes per slot; the full cache holds the
    # prompt and the new tokens rounded up to a multiple of 256 slots
    slot_bytes = 6 * 3 * 64 * 2 * 4
    assert full["kv_bytes"] == 2 * slot_bytes * 768  # 2 rows
    # the hybrid holds 25% of the 644 tokens' full cache
    assert hybrid["kv_bytes"] / (2 * slot_bytes * 644) == pytest.approx(0.25, abs=0.005)
    assert full["weights_bytes"] == hybrid["weights_bytes"] > 0
    assert hybrid["step_bytes"] < full["step_bytes"]
    assert report["backend"] == "cpu" and report["wall_s"] > 0


def test_accelerator_benchmark_imports_only_jax_and_flax(tiny_run):
    _, modules = tiny_run
    assert not set(NOT_IMPORTED) & set(modules)
    assert {"jax", "flax", "eval", "smartkv_jax"} <= set(modules)


def test_cases_past_the_deadline_are_listed_as_skipped(tmp_path):
    out = tmp_path / "b.json"
    rows = bench_accelerator.main(
        ["--models", "llama-3.1-8b", "--contexts", "8192", "--batches", "1", "4"]
        + ["--max-seconds", "0", "--out", str(out)]
    )
    assert [(r["batch"], r["policy"], r["skipped"]) for r in rows] == [
        (1, "full", "past --max-seconds"),
        (1, "hybrid", "past --max-seconds"),
        (4, "full", "past --max-seconds"),
        (4, "hybrid", "past --max-seconds"),
    ]
    assert json.loads(out.read_text())["cases"] == rows


def test_bad_arguments_are_one_line_errors(capsys):
    with pytest.raises(SystemExit):
        bench_accelerator.main(["--models", "gpt-5"])
    assert "--models" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_accelerator.main(["--new-tokens", "1"])
    assert "--new-tokens" in capsys.readouterr().err


def test_random_shapes_take_the_case_length_and_real_models_refuse_layers():
    m = case_model(Case("random:smollm2-135m", 9000, 1, new_tokens=32, layers=1))
    assert m.cfg.max_position == 9032 and m.cfg.num_layers == 1 and m.tokenizer is None
    short = case_model(Case("random:smollm2-135m", 100, 1, layers=1))
    assert short.cfg.max_position == 8192  # the shape's own limit when the case fits
    with pytest.raises(SmartKVError, match="--layers needs a random:NAME model"):
        case_model(Case("smollm2", 100, 1, layers=1))


def test_a_benchmarks_table_and_rows_land_side_by_side(tmp_path):
    rows = [{"context": 4096, "tokens_per_s": 12.5}]
    write_table_and_rows(tmp_path / "new" / "bench.json", "| a |\n|---|", rows)
    assert (tmp_path / "new" / "bench.md").read_text() == "| a |\n|---|\n"
    assert json.loads((tmp_path / "new" / "bench.json").read_text()) == rows

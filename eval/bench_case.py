"""One speed-and-memory case of the decode benchmarks: a model, a context length, a batch and
a cache policy; prefill (time to the first token), decode tokens/s, compile time, KV bytes and
peak memory. Shared by eval/bench_decode.py (this CPU, against PyTorch) and
eval/bench_accelerator.py (one GPU or TPU host); imports nothing beyond JAX, flax and numpy, so
it runs on a bare accelerator install.

    python -m eval.bench_case --model random:qwen2.5-0.5b --context 32768 --batch 1 \\
                              --policy hybrid --budget 0.25 --new-tokens 16

run as a command, the case gets a process of its own and prints one JSON line: its peak memory
is then this case's alone (the process's peak resident set on CPU, the device's peak bytes in
use on an accelerator).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from smartkv_jax.convert import DTYPES, LoadedModel, load_model
from smartkv_jax.data import read_text, text_files
from smartkv_jax.errors import SmartKVError
from smartkv_jax.gates import GateConfig, Gates, init_gates
from smartkv_jax.generate import generate
from smartkv_jax.jsonio import dumps
from smartkv_jax.model_shapes import RANDOM_PREFIX, model_shape, random_model

POLICIES = ("full", "hybrid")  # what the benchmarks compare by default


@dataclasses.dataclass(frozen=True)
class Case:
    """model: a `load_model` name (say random:llama-3.1-8b); context: prompt tokens per row;
    policy: a `smartkv eval` policy name, at `budget` of the full cache (unless full);
    chunk: prefill chunk (tokens); text: a .txt directory for real prompts (None: the shared
    books; models without a tokenizer read random token ids); calibrated: the label store
    or table of a hybrid-calibrated policy; layers: keep only the first N layers of a
    random:NAME shape (small runs of the benchmarks' own code, say in tests)."""

    model: str
    context: int
    batch: int
    policy: str = "full"
    budget: float = 0.25
    new_tokens: int = 32
    dtype: str = "float32"
    chunk: int = 512
    text: str | None = None
    calibrated: str | None = None
    layers: int | None = None


def case_model(case: Case) -> LoadedModel:
    """The case's model in its dtype. A random:NAME shape is cut to `layers` if given, and its
    position limit raised to the case's length if below it (random weights measure speed
    only, which does not depend on the limit; say the smollm2-135m shape at 32k tokens)."""
    if not case.model.startswith(RANDOM_PREFIX):
        if case.layers is not None:
            raise SmartKVError(f"--layers needs a random:NAME model, not {case.model!r}")
        return load_model(case.model, DTYPES[case.dtype])
    name = case.model.removeprefix(RANDOM_PREFIX)
    length = case.context + case.new_tokens
    changes = {"max_position": max(model_shape(name).max_position, length)}
    if case.layers is not None:
        changes["num_layers"] = case.layers
    return LoadedModel(random_model(name, DTYPES[case.dtype], **changes), None, case.model)


def book_prompts(tokenizer, n_rows: int, n_tokens: int, source=None) -> list[list[int]]:
    """`n_rows` prompts of `n_tokens` tokens from the text source, at different offsets."""
    ids: list[int] = []
    for f in text_files(source):
        ids += tokenizer(read_text(f)).input_ids
        if len(ids) >= n_rows * n_tokens:
            break
    if len(ids) < n_tokens:
        raise ValueError(f"the text source holds only {len(ids)} tokens, need {n_tokens}")
    step = max(1, (len(ids) - n_tokens) // max(n_rows, 1))
    return [ids[i * step : i * step + n_tokens] for i in range(n_rows)]


def case_prompts(m: LoadedModel, case: Case) -> list[list[int]]:
    """[batch][context] token ids: book text, or random ids (seed 0) for a model without a
    tokenizer (its weights are random too, so text would mean nothing)."""
    if m.tokenizer is not None:
        return book_prompts(m.tokenizer, case.batch, case.context, case.text)
    rng = np.random.default_rng(0)
    return rng.integers(0, m.cfg.vocab_size, (case.batch, case.context)).tolist()


def random_gates(m: LoadedModel) -> Gates:
    """Untrained gates: they cost what trained ones cost, which is all a speed case needs."""
    cfg = GateConfig(m.cfg.num_layers, m.cfg.num_kv_heads, m.cfg.head_dim)
    return init_gates(cfg, jax.random.PRNGKey(0))


def _proc_status_bytes(field: str) -> int | None:
    """A "VmHWM:   123 kB"-style line of /proc/self/status in bytes (None off Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_peak_memory() -> bool:
    """Start the CPU's peak-resident count afresh from the current resident set (Linux:
    /proc/self/clear_refs), so the peak read later is the case's own, not the model load's.
    Memory freed since (the model's staging buffers) is first handed back to the system
    (glibc's malloc_trim), so the case cannot hide its own growth by reusing it.
    False where that cannot be done (an accelerator's peak is the device's, kept by XLA)."""
    if jax.devices()[0].platform != "cpu":
        return False
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except (OSError, AttributeError):
        return False
    return True


def peak_memory_bytes() -> int:
    """Peak memory of this process: the device's peak bytes in use on an accelerator; on CPU
    the peak resident set (weights, cache, activations and the runtime) since the last
    `reset_peak_memory`, or since the process started where it could not be reset."""
    dev = jax.devices()[0]
    if dev.platform != "cpu":
        stats = dev.memory_stats() or {}
        return int(stats.get("peak_bytes_in_use", 0))
    hwm = _proc_status_bytes("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _step_bytes(m: LoadedModel, res) -> dict[str, int | None]:
    """weights_bytes, cache_bytes, prefill_temp_bytes and their sum step_bytes (see run_case)."""
    weights = sum(x.nbytes for x in jax.tree.leaves(nnx.state(m.model, nnx.Param)))
    cache, temp = res.cache.nbytes(), res.prefill_temp_bytes
    step = None if temp is None else weights + cache + temp
    return {
        "weights_bytes": weights,
        "cache_bytes": cache,
        "prefill_temp_bytes": temp,
        "step_bytes": step,
    }


def run_case(m: LoadedModel, case: Case, gates: Gates | None = None) -> dict[str, Any]:
    """Time one case on `m` (compiled first, so prefill_s is the time to the first token of a
    compiled program; compile_s apart). KV bytes: the keys and values the cache allocates.
    peak_bytes: the peak while prefilling and decoding, counted from when every program is
    compiled (the model's resident weights included; its loading and XLA's compiling left
    out where the count can be reset: peak_reset); resident_before_bytes: the resident set
    at that point (CPU). step_bytes: what one prefill chunk step holds at once by XLA's
    accounting: weights_bytes, cache_bytes (keys, values, slot positions and scores) and
    prefill_temp_bytes, its working memory (None where XLA gives no analysis)."""
    from train.policy_names import parse_policy

    prompts = case_prompts(m, case)
    budget = None if case.policy == "full" else case.budget
    length = case.context + case.new_tokens
    policy = parse_policy(case.policy, m.cfg.num_layers, length, budget, case.calibrated)
    gates = gates if gates is not None else random_gates(m)
    mark: dict[str, Any] = {}

    def start_count() -> None:  # every program compiled, nothing run yet
        mark["reset"] = reset_peak_memory()
        mark["before"] = _proc_status_bytes("VmRSS")

    res = generate(
        m.model, prompts, case.new_tokens, policy=policy, stop_tokens=(), chunk=case.chunk,
        gates=gates, on_compiled=start_count,
    )  # fmt: skip
    return {
        **dataclasses.asdict(case),
        "compile_s": res.compile_s,
        "prefill_s": res.prefill_s,
        "prefill_tok_s": case.batch * case.context / max(res.prefill_s, 1e-9),
        "decode_tok_s": res.decode_tokens_per_s,
        "kv_bytes": res.cache.kv_bytes(),
        **_step_bytes(m, res),
        "peak_bytes": peak_memory_bytes(),
        "peak_reset": mark["reset"],
        "resident_before_bytes": mark["before"],
        "device": jax.devices()[0].device_kind,
    }


def case_in_subprocess(case: Case, gates_ckpt: str | None = None) -> dict[str, Any]:
    """`run_case` in a fresh process, so its peak memory is this case's alone."""
    cmd = [sys.executable, "-m", "eval.bench_case", "--json"]
    for field, value in dataclasses.asdict(case).items():
        if value is not None:
            cmd += [f"--{field.replace('_', '-')}", str(value)]
    if gates_ckpt:
        cmd += ["--gates", gates_ckpt]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"benchmark case {case} failed: {out.stderr.strip()[-800:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    defaults = Case("", 0, 0)
    ap.add_argument("--model", required=True, help="a model name, say random:qwen2.5-0.5b")
    ap.add_argument("--context", type=int, required=True, help="prompt tokens per row")
    ap.add_argument("--batch", type=int, required=True, help="rows")
    ap.add_argument("--policy", default=defaults.policy, help="cache policy (full, hybrid, ...)")
    ap.add_argument("--budget", type=float, default=defaults.budget, help="memory fraction")
    ap.add_argument("--new-tokens", type=int, default=defaults.new_tokens)
    ap.add_argument("--dtype", default=defaults.dtype, choices=sorted(DTYPES))
    ap.add_argument("--chunk", type=int, default=defaults.chunk, help="prefill chunk (tokens)")
    ap.add_argument("--text", default=None, help="directory of .txt files for the prompts")
    ap.add_argument("--calibrated", default=None, help="labels or table for hybrid-calibrated")
    ap.add_argument("--layers", type=int, default=None, help="first N layers of a random shape")
    ap.add_argument("--gates", default=None, help="gate checkpoint (default: random gates)")
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    gates_ckpt = args.gates
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(Case)}
    case = Case(**fields)
    if case.context < 1 or case.batch < 1 or case.new_tokens < 2:
        sys.exit("bench_case: --context and --batch must be >= 1 and --new-tokens >= 2")
    m = case_model(case)
    gates = None
    if gates_ckpt:
        from smartkv_jax.gate_checkpoint import load_gates

        gates = load_gates(gates_ckpt)[0]
    print(dumps(run_case(m, case, gates)))


if __name__ == "__main__":
    main()

"""Checkpoints load tensor by tensor in their own dtype: bf16, f16 and f32 safetensors,
single and sharded, load equal to the weights stored, and the peak host memory of a load
stays near the model in its compute dtype plus a few tensors (not a float32 copy of it)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from smartkv_jax.checkpoint_files import gguf_tensors, open_gguf, safetensors_arrays
from smartkv_jax.convert import load_hf_dir

from .conftest import tiny_hf_config

torch = pytest.importorskip("torch")

SAFETENSORS_NAMES = {np.float32: "F32", np.float16: "F16", ml_dtypes.bfloat16: "BF16"}


def write_safetensors(path, tensors: dict[str, np.ndarray | tuple]) -> None:
    """A safetensors file; a (shape, dtype) tuple in place of an array writes zeros without
    allocating them (a sparse file), for large checkpoints."""
    header, offset, parts = {}, 0, []
    for name, t in tensors.items():
        shape, dtype = (t.shape, t.dtype.type) if isinstance(t, np.ndarray) else t
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        header[name] = {
            "dtype": SAFETENSORS_NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + n],
        }
        parts.append(t if isinstance(t, np.ndarray) else None)
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        base = f.tell()
        for part, entry in zip(parts, header.values()):
            if part is not None:
                f.seek(base + entry["data_offsets"][0])
                f.write(np.ascontiguousarray(part).tobytes())
        f.truncate(base + offset)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_safetensors_read_in_their_own_dtype(tmp_path, dtype):
    a = np.arange(12, dtype=np.float32).reshape(3, 4).astype(dtype)
    write_safetensors(tmp_path / "x.safetensors", {"a": a, "b": a[:1]})
    got = dict(safetensors_arrays(tmp_path / "x.safetensors"))
    assert got["a"].dtype == np.dtype(dtype) and got["b"].shape == (1, 4)
    np.testing.assert_array_equal(got["a"], a)


def test_gguf_header_and_tensors_match_the_gguf_package(tmp_path):
    """Our header reader against gguf.GGUFReader: fields (a string array stepped over),
    tensor table and dequantized values of float and Q8_0 tensors."""
    gguf = pytest.importorskip("gguf")
    rng = np.random.default_rng(0)
    w32, w8 = rng.normal(size=(3, 64)).astype(np.float32), rng.normal(size=(5, 64))
    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(7)
    writer.add_token_list(["<s>", "a", "ab" * 40])
    writer.add_array("test.floats", [0.5, 1.5])
    writer.add_tensor("f.weight", w32)
    q8 = gguf.quants.quantize(w8.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("q.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    header, ref = open_gguf(path), gguf.GGUFReader(str(path))
    assert header.fields["llama.block_count"] == 7
    assert header.fields["general.architecture"] == "llama"
    assert header.fields["test.floats"].tolist() == [0.5, 1.5]
    assert "tokenizer.ggml.tokens" not in header.fields  # string arrays are stepped over
    assert [(t.name, t.offset) for t in header.tensors] == [
        (t.name, int(t.data_offset)) for t in ref.tensors
    ]
    got = dict(gguf_tensors(header))
    np.testing.assert_array_equal(got["f.weight"], w32)
    want8 = gguf.quants.dequantize(ref.tensors[1].data, ref.tensors[1].tensor_type)
    np.testing.assert_array_equal(got["q.weight"], want8.reshape(5, 64))
    assert np.abs(got["q.weight"] - w8).max() < 0.05  # Q8_0 keeps ~2 digits


def test_sharded_bf16_checkpoint_loads_its_exact_weights(tmp_path):
    import transformers

    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(tiny_hf_config("llama")).bfloat16()
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ours = load_hf_dir(tmp_path, jnp.bfloat16).model
    want = hf.model.layers[1].mlp.down_proj.weight.detach().float().numpy().T
    got = np.asarray(ours.stacks[0].w_down[...][1].astype(jnp.float32))
    np.testing.assert_array_equal(got, want)
    assert ours.dtype == jnp.bfloat16


PEAK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax.numpy as jnp
    from smartkv_jax.convert import load_hf_dir
    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20
    def peak_mb():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) / 1024
    load_hf_dir(sys.argv[1], jnp.bfloat16)  # warm-up: imports, the backend, first compiles
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (ru_maxrss would carry the parent's over fork + exec)
    before = rss_mb()
    if sys.argv[3] == "staged":  # what the old loader did: a float32 copy of every tensor first
        from pathlib import Path
        from smartkv_jax.checkpoint_files import safetensors_arrays
        file = Path(sys.argv[2]) / "model.safetensors"
        staged = [a.astype("float32") for _, a in safetensors_arrays(file)]
    m = load_hf_dir(sys.argv[2], jnp.bfloat16).model
    print(json.dumps({"before": before, "peak": peak_mb()}))
    """
)


def _llama_dir(path, vocab: int, hidden: int, inter: int, layers: int) -> tuple[float, float]:
    """A bf16 Llama checkpoint of zeros; returns (model MiB, largest tensor MiB) in bf16."""
    cfg = tiny_hf_config(
        "llama",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=4,
    )
    cfg.to_json_file(path / "config.json")
    kv = hidden // 4
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden)}
    shapes["model.norm.weight"] = (hidden,)
    per_layer = {
        "self_attn.q_proj.weight": (hidden, hidden),
        "self_attn.k_proj.weight": (kv, hidden),
        "self_attn.v_proj.weight": (kv, hidden),
        "self_attn.o_proj.weight": (hidden, hidden),
        "mlp.gate_proj.weight": (inter, hidden),
        "mlp.up_proj.weight": (inter, hidden),
        "mlp.down_proj.weight": (hidden, inter),
        "input_layernorm.weight": (hidden,),
        "post_attention_layernorm.weight": (hidden,),
    }
    for i in range(layers):
        shapes.update({f"model.layers.{i}.{k}": s for k, s in per_layer.items()})
    write_safetensors(
        path / "model.safetensors", {k: (s, ml_dtypes.bfloat16) for k, s in shapes.items()}
    )
    sizes = [2 * int(np.prod(s)) / 2**20 for s in shapes.values()]
    return sum(sizes), max(sizes)


def test_peak_host_memory_of_a_load(tmp_path):
    """Peak RSS growth while loading a 157M-parameter bf16 checkpoint in bf16 (after a tiny
    one has loaded, so imports and the backend are warm) stays within the model in bf16 (on a
    CPU the device is the host) plus three of its largest tensor and 64 MiB of compiled
    programs. A float32 staging copy of the model (the old loader) would need the model's
    size twice over on top."""
    tiny, mid = tmp_path / "tiny", tmp_path / "mid"
    tiny.mkdir(), mid.mkdir()
    _llama_dir(tiny, 97, 64, 96, 2)
    model_mb, largest_mb = _llama_dir(mid, 32768, 1024, 2816, 8)
    bound = model_mb + 3 * largest_mb + 64

    def growth(mode: str) -> float:
        out = subprocess.run(
            [sys.executable, "-c", PEAK_SCRIPT, str(tiny), str(mid), mode],
            capture_output=True,
            text=True,
            check=True,
        )
        got = json.loads(out.stdout.strip().splitlines()[-1])
        return got["peak"] - got["before"]

    direct = growth("direct")
    assert direct <= bound, (direct, model_mb, largest_mb)
    assert growth("staged") > bound  # the measure catches a float32 staging copy

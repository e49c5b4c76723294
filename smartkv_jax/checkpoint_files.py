"""Reading checkpoint files tensor by tensor, each checked before any weight is read:
safetensors (in the file's own dtype; single files or shards with an index)
and GGUF (header read by gguf_file; each tensor dequantized with the gguf package)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .config import UnsupportedArchitectureError
from .errors import InputFileError
from .gguf_file import GGUFFile, GGUFFormatError, read_gguf
from .input_files import read_json_file, require_object


class CheckpointError(InputFileError):
    """A checkpoint file is incomplete, damaged or does not match its config."""


GGUF_MAGIC = b"GGUF"
GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma3")
# GGUF fields (after "<arch>.") that fix the weights' shapes
GGUF_SHAPE_FIELDS = (
    "block_count",
    "embedding_length",
    "feed_forward_length",
    "attention.head_count",
)


def open_gguf(path: Path) -> GGUFFile:
    """The header of the GGUF file at `path`, after checks whose errors name the file and
    what is wrong: FileNotFoundError if it is missing, CheckpointError if it is a directory,
    empty, not a GGUF file, damaged, truncated or without tensors."""
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a GGUF file")
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"GGUF file {path} is empty")
    with path.open("rb") as f:
        head = f.read(len(GGUF_MAGIC))
    if head != GGUF_MAGIC:
        raise CheckpointError(
            f"{path} is not a GGUF file: it starts with {head!r}, a GGUF file with {GGUF_MAGIC!r}"
        )
    try:
        header = read_gguf(path)
    except GGUFFormatError as err:
        raise CheckpointError(
            f"{path} is not a readable GGUF file ({size} bytes; truncated or damaged): {err}"
        ) from err
    end = max((t.offset + t.n_bytes for t in header.tensors), default=0)
    if end > size:
        raise CheckpointError(
            f"GGUF file {path} is truncated: its tensors end at byte {end}, the file has {size}"
        )
    if not header.tensors:
        raise CheckpointError(f"GGUF file {path} holds no tensors")
    return header


def gguf_architecture(header: GGUFFile) -> str:
    path, arch = header.path, header.fields.get("general.architecture")
    if arch is None:
        raise CheckpointError(f"GGUF file {path} has no general.architecture field")
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"GGUF file {path}: architecture {arch!r} is not supported; supported: "
            f"{', '.join(GGUF_ARCHITECTURES)}"
        )
    needed = [f"{arch}.{key}" for key in GGUF_SHAPE_FIELDS]
    missing = [key for key in needed if key not in header.fields]
    if missing:  # transformers would fill them with its defaults (a 7B shape)
        raise CheckpointError(
            f"GGUF file {path} has no {', '.join(missing)} (a {arch} model needs "
            f"{', '.join(needed)})"
        )
    return arch


def gguf_tensors(header: GGUFFile) -> Iterator[tuple[str, np.ndarray]]:
    """(name, dequantized float32 array [out, in]) of every tensor of a GGUF file, each
    read from the file into its own buffer when it is reached."""
    import gguf

    with header.path.open("rb") as f:
        for t in header.tensors:
            kind = gguf.GGMLQuantizationType(t.ggml_type).name
            if kind in ("I8", "I16", "I32", "I64"):
                raise CheckpointError(
                    f"GGUF file {header.path}: tensor {t.name!r} holds integers ({kind}); "
                    "weights must be floating point or quantized"
                )
            try:
                raw = header.raw(t, f)
                array = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(t.ggml_type))
            except Exception as err:  # an unsupported quantization or a damaged block
                raise CheckpointError(
                    f"GGUF file {header.path}: cannot dequantize tensor {t.name!r} ({kind}): {err}"
                ) from err
            yield t.name, array.reshape(t.shape)


SAFETENSORS_DTYPES = {"F16": "<f2", "BF16": "bfloat16", "F32": "<f4", "F64": "<f8"}


def _safetensors_dtype(name: str) -> np.dtype:
    if name == "BF16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(SAFETENSORS_DTYPES[name])


def safetensors_header(path: Path) -> tuple[dict[str, dict], int]:
    """(tensor name -> {"dtype", "shape", "data_offsets"}, offset of the data) of a
    safetensors file, every entry checked against the file's size: CheckpointError starting
    "cannot read PATH" for an empty, garbled, truncated file or a non-float dtype."""
    where, size = f"cannot read {path}", path.stat().st_size
    if size < 8:
        raise CheckpointError(f"{where}: {size} bytes, too short for a safetensors file")
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > size - 8:
            raise CheckpointError(
                f"{where}: not a safetensors file, or truncated: its first 8 bytes give a header "
                f"of {n} bytes, the file has {size - 8} after them"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{where}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: not a safetensors file (its header is not an object)")
    header.pop("__metadata__", None)
    ends = [_check_safetensor_entry(where, name, entry) for name, entry in header.items()]
    if 8 + n + max(ends, default=0) > size:
        raise CheckpointError(
            f"{where}: truncated: its tensors end at byte {8 + n + max(ends)}, the file has {size}"
        )
    return header, 8 + n


def _check_safetensor_entry(where: str, name: str, entry: object) -> int:
    """The end offset of one header entry, after checking its dtype, shape and size."""
    try:
        dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        shape_ok = all(isinstance(d, int) and d >= 0 for d in shape)
        offsets_ok = isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end
    except (TypeError, KeyError, ValueError):
        shape_ok = offsets_ok = False
    if not (shape_ok and offsets_ok):
        raise CheckpointError(f"{where}: tensor {name!r} has a malformed header entry {entry!r}")
    if dtype not in SAFETENSORS_DTYPES:
        raise CheckpointError(
            f"{where}: tensor {name!r} has dtype {dtype}; weights must be "
            f"{', '.join(SAFETENSORS_DTYPES)}"
        )
    need = int(np.prod(shape, dtype=np.int64)) * _safetensors_dtype(dtype).itemsize
    if end - begin != need:
        raise CheckpointError(
            f"{where}: tensor {name!r} of shape {shape} in {dtype} needs {need} bytes, its "
            f"header gives {end - begin}"
        )
    return end


def safetensors_arrays(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array in the file's own dtype) of every tensor of a safetensors file, after
    `safetensors_header`'s checks. Each tensor is read into its own buffer (not memory-
    mapped, whose pages would stay resident), so the host holds one tensor at a time."""
    header, start = safetensors_header(path)
    with path.open("rb") as f:
        for name, entry in header.items():
            begin, _ = entry["data_offsets"]
            dtype = _safetensors_dtype(entry["dtype"])
            f.seek(start + begin)
            array = np.fromfile(f, dtype, count=int(np.prod(entry["shape"], dtype=np.int64)))
            yield name, array.reshape(entry["shape"])


def safetensors_files(path: Path) -> list[Path]:
    """The *.safetensors files of a model directory; every shard its index names must exist."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} has no *.safetensors files")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        where = f"safetensors index {index}"
        weight_map = require_object(
            read_json_file(index, "safetensors index"), where, ["weight_map"]
        )
        shards = require_object(weight_map.get("weight_map", {}), f"{where}: weight_map", [])
        absent = sorted({str(f) for f in shards.values() if not (path / str(f)).is_file()})
        if absent:
            raise CheckpointError(f"{index} names shards that are missing: {', '.join(absent)}")
    for f in files:
        safetensors_header(f)  # every file checked before any weight is read
    return files

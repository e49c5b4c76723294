"""A GGUF file's header read directly: its settings and where each tensor lies.

The gguf package's reader turns every field into numpy views, which takes about 30 s for
Gemma 3's 262k-token vocabulary. Loading needs only the model settings and the tensor
table, so string arrays (the vocabulary; transformers reads the tokenizer) are stepped
over, and each tensor is read into its own buffer when it is needed (not memory-mapped,
whose pages would stay resident). Layout (little-endian, versions 2 and 3):
magic, version u32, tensor count u64, field count u64; fields (key, type u32, value);
tensor infos (name, n_dims u32, dims u64 × n, ggml type u32, offset u64); data from the
next multiple of `general.alignment` (32 by default)."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

# GGUF value type -> struct format of one scalar
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?"}
_SCALARS.update({10: "<Q", 11: "<q", 12: "<d"})
_STRING, _ARRAY = 8, 9
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?"}
_NUMPY.update({10: "<u8", 11: "<i8", 12: "<f8"})
_MAX_FIELD_BYTES = 1 << 30  # larger claims come from damaged headers


class GGUFFormatError(ValueError):
    """The bytes do not follow the GGUF layout (a damaged or truncated header)."""


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # row-major, outermost first (GGUF stores it innermost first)
    ggml_type: int  # a gguf.GGMLQuantizationType value
    offset: int  # from the start of the file
    n_bytes: int


@dataclass(frozen=True)
class GGUFFile:
    path: Path
    fields: dict[str, object]  # scalars, strings and numeric arrays; string arrays skipped
    tensors: tuple[GGUFTensor, ...]

    def raw(self, tensor: GGUFTensor, f: BinaryIO) -> np.ndarray:
        """The tensor's bytes [rows, bytes per row] (the row is GGUF's innermost dimension)."""
        f.seek(tensor.offset)
        data = np.fromfile(f, np.uint8, count=tensor.n_bytes)
        if data.size != tensor.n_bytes:
            raise GGUFFormatError(f"tensor {tensor.name!r} ends past the end of the file")
        rows = int(np.prod(tensor.shape[:-1], dtype=np.int64))
        return data.reshape(rows, -1)


def _read(f: BinaryIO, n: int) -> bytes:
    raw = f.read(n) if n <= _MAX_FIELD_BYTES else b""
    if len(raw) != n:
        raise GGUFFormatError(f"a field of {n} bytes runs past the end of the header")
    return raw


def _unpack(f: BinaryIO, fmt: str):
    return struct.unpack(fmt, _read(f, struct.calcsize(fmt)))[0]


def _string(f: BinaryIO) -> str:
    return _read(f, _unpack(f, "<Q")).decode("utf-8", errors="replace")


def _value(f: BinaryIO, kind: int):
    if kind in _SCALARS:
        return _unpack(f, _SCALARS[kind])
    if kind == _STRING:
        return _string(f)
    if kind != _ARRAY:
        raise GGUFFormatError(f"unknown value type {kind}")
    item, count = _unpack(f, "<I"), _unpack(f, "<Q")
    if item == _STRING:  # stepped over: only the tokenizer has these
        for _ in range(count):
            f.seek(_unpack(f, "<Q"), 1)
        return None
    if item not in _NUMPY:
        raise GGUFFormatError(f"unsupported array item type {item}")
    dtype = np.dtype(_NUMPY[item])
    return np.frombuffer(_read(f, count * dtype.itemsize), dtype)


def _tensor_info(f: BinaryIO) -> tuple[str, tuple[int, ...], int, int]:
    name = _string(f)
    n_dims = _unpack(f, "<I")
    if n_dims > 8:
        raise GGUFFormatError(f"tensor {name!r} claims {n_dims} dimensions")
    dims = tuple(_unpack(f, "<Q") for _ in range(n_dims))
    return name, tuple(reversed(dims)), _unpack(f, "<I"), _unpack(f, "<Q")


def _n_bytes(name: str, shape: tuple[int, ...], ggml_type: int) -> int:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise GGUFFormatError(f"tensor {name!r} has unknown ggml type {ggml_type}") from None
    n = int(np.prod(shape, dtype=np.int64))
    if shape and shape[-1] % block:
        raise GGUFFormatError(f"tensor {name!r}: rows of {shape[-1]} are not whole blocks")
    return n // block * size


def read_gguf(path: Path) -> GGUFFile:
    """The fields and tensor table of a GGUF file; GGUFFormatError if they are damaged."""
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise GGUFFormatError("no GGUF magic")
        version = _unpack(f, "<I")
        if version not in (2, 3):
            raise GGUFFormatError(f"GGUF version {version} (this reader knows 2 and 3)")
        n_tensors, n_fields = _unpack(f, "<Q"), _unpack(f, "<Q")
        fields = {}
        for _ in range(n_fields):
            key = _string(f)
            fields[key] = _value(f, _unpack(f, "<I"))
        infos = [_tensor_info(f) for _ in range(n_tensors)]
        align = int(fields.get("general.alignment", 32))
        start = -(-f.tell() // align) * align
    tensors = tuple(
        GGUFTensor(name, shape, kind, start + offset, _n_bytes(name, shape, kind))
        for name, shape, kind, offset in infos
    )
    return GGUFFile(path, {k: v for k, v in fields.items() if v is not None}, tensors)

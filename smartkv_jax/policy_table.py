"""The per-layer policy table: which strategy (smartkv_jax/policy.py) manages each layer's
cache, its JSON form, and the library's named tables (docs/design.md: budget, the cache).
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

from .errors import InputFileError, SmartKVError, check_range
from .input_files import (
    json_kind,
    parse_json_text,
    read_text_file,
    refuse_unknown_keys,
    require_keys,
    require_object,
)
from .jsonio import dumps
from .policy import (
    POLICY_KINDS,
    CachePolicy,
    FullPolicy,
    GatedPolicy,
    RecentPolicy,
    SnapKVPolicy,
    WindowPolicy,
    policy_class,
)

# Fields every row of a version-1 table carried, whatever its kind, with their defaults: a
# row may still hold them where its kind has no such setting, as long as they are defaults.
_LEGACY_DEFAULTS = {
    "n_sink": 4,
    "recent": 32,
    "margin": 1.0,
    "discount": None,
    "mask_expired": False,
    "obs_window": 32,
    "pool": 7,
}


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    """Per-layer policy table: `layers[i]` manages layer i."""

    layers: tuple[CachePolicy, ...]
    name: str = "custom"

    @classmethod
    def uniform(cls, num_layers: int, policy: CachePolicy | None = None) -> PolicyConfig:
        p = policy or FullPolicy()
        return cls(layers=(p,) * num_layers, name=p.kind)

    def resolve(self, max_len: int, windows: tuple[int, ...] = ()) -> PolicyConfig:
        """The table as it runs on sequences of up to `max_len` tokens of a model with per-layer
        attention `windows` (ModelConfig.layer_windows; () = every layer global).

        Capacities None become `max_len`, and none exceeds it. Each layer's policy carries
        its window. A windowed layer whose policy was not written for that window keeps its
        native cache, its min(W, max_len) newest tokens: all the model reads, so nothing is
        lost. One whose row sets that window is budgeted by its own policy, at most W slots.
        Raises SmartKVError for a row that sets a window the model does not have."""
        windows = windows or (0,) * len(self.layers)
        layers = []
        for i, (p, w) in enumerate(zip(self.layers, windows)):
            if p.window and p.window != w:
                raise SmartKVError(
                    f"policy {self.name!r} gives layer {i} an attention window of {p.window}; "
                    f"the model's is {w or 'none (a global layer)'}"
                )
            if w and not p.window:
                p = RecentPolicy(window=w)
            cap = min(p.capacity or max_len, max_len, w or max_len)
            layers.append(dataclasses.replace(p, capacity=cap))
        return dataclasses.replace(self, layers=tuple(layers))

    def check_windows(self, windows: tuple[int, ...]) -> None:
        """ValueError unless every layer's policy carries the model's window (`resolve`)."""
        got = tuple(p.window for p in self.layers)
        if got != (windows or (0,) * len(self.layers)):
            raise ValueError(
                f"policy windows {got} differ from the model's layer windows {windows}; "
                "resolve the policy with the model's layer_windows"
            )

    def groups(self) -> list[tuple[int, int, CachePolicy]]:
        """Maximal runs of consecutive layers with the same policy: (start, end, policy)."""
        out: list[tuple[int, int, CachePolicy]] = []
        for i, p in enumerate(self.layers):
            if out and out[-1][2] == p:
                out[-1] = (out[-1][0], i + 1, p)
            else:
                out.append((i, i + 1, p))
        return out

    @property
    def needs(self) -> frozenset[str]:
        """Names of the per-layer side inputs some layer's policy reads ("gates", ...)."""
        return frozenset(p.needs for p in self.layers if p.needs)

    @property
    def needs_gates(self) -> bool:
        return "gates" in self.needs

    @property
    def needs_oracle(self) -> bool:
        return "oracle" in self.needs

    def slots(self, max_len: int, windows: tuple[int, ...] = ()) -> int:
        """Total slots per (batch, KV head) over all layers at sequence length `max_len`."""
        return sum(p.capacity for p in self.resolve(max_len, windows).layers)

    def memory_fraction(self, max_len: int, windows: tuple[int, ...] = ()) -> float:
        """KV bytes of this policy over the model's native cache's at sequence length
        `max_len` (every token of a global layer, the window of a windowed one)."""
        return self.slots(max_len, windows) / native_slots(len(self.layers), max_len, windows)

    def table(self) -> str:
        """Markdown table of layer ranges and their policies (printed in every report)."""
        rows = ["| layers | policy |", "|---|---|"]
        rows += [f"| {a}-{b - 1} | {p.describe()} |" for a, b, p in self.groups()]
        return f"policy: {self.name}\n" + "\n".join(rows)

    def to_json(self) -> str:
        rows = [
            {"layers": f"{a}-{b - 1}", "kind": p.kind, **dataclasses.asdict(p)}
            for a, b, p in self.groups()
        ]
        return dumps({"name": self.name, "layers": rows}, indent=2)

    @classmethod
    def from_json(cls, text: str, num_layers: int, where: str = "policy table") -> PolicyConfig:
        """Parse a table written by `to_json`: {"name": ..., "layers": [rows]}, each row
        {"layers": "first-last", "kind": ..., settings}, the rows covering every layer once.
        Raises InputFileError starting with `where` and naming the row and what is wrong."""
        data = require_object(parse_json_text(text, where), where, _TABLE_KEYS)
        require_keys(data, where, ["layers"], ["name"])
        refuse_unknown_keys(data, where, _TABLE_KEYS)
        rows, name = data["layers"], data.get("name", "custom")
        if not isinstance(rows, list) or not rows:
            raise InputFileError(
                f"{where}: 'layers' holds {json_kind(rows)}, expected a non-empty list of rows "
                '{"layers": "first-last", "kind": ..., settings}'
            )
        if not isinstance(name, str):
            raise InputFileError(f"{where}: 'name' must be a string, got {name!r}")
        owner: list[int | None] = [None] * num_layers
        layers: list[CachePolicy | None] = [None] * num_layers
        for i, row in enumerate(rows):
            first, last, policy = _table_row(row, num_layers, f"{where}, row {i}")
            for layer in range(first, last + 1):
                if owner[layer] is not None:
                    raise InputFileError(
                        f"{where}: layer {layer} is in rows {owner[layer]} and {i}; "
                        "each layer must be in exactly one row"
                    )
                owner[layer], layers[layer] = i, policy
        missing = [i for i, p in enumerate(layers) if p is None]
        if missing:
            raise InputFileError(
                f"{where} does not cover layers {missing} (the model has {num_layers} layers)"
            )
        return cls(layers=tuple(layers), name=name)

    @classmethod
    def from_file(cls, path: str | Path, num_layers: int) -> PolicyConfig:
        """The table in JSON file `path` (FileNotFoundError if none; InputFileError naming the
        file for an empty, garbled or malformed one)."""
        path = Path(path)
        text = read_text_file(path, "policy table")
        return cls.from_json(text, num_layers, where=f"policy table {path}")


def native_slots(num_layers: int, max_len: int, windows: tuple[int, ...] = ()) -> int:
    """Slots per (batch, KV head) of the model's own cache at `max_len` tokens: `max_len` for
    a global layer, min(W, max_len) for a layer with attention window W."""
    return sum(min(w or max_len, max_len) for w in windows or (0,) * num_layers)


_TABLE_KEYS = ("name", "layers")
_ROW_SHAPE = '{"layers": "first-last", "kind": ..., settings}'


def _table_row(row: object, num_layers: int, where: str) -> tuple[int, int, CachePolicy]:
    """(first layer, last layer, policy) of one row of a JSON table."""
    if not isinstance(row, dict):
        raise InputFileError(f"{where} is {json_kind(row)}, expected an object {_ROW_SHAPE}")
    row = dict(row)
    if "layers" not in row:
        raise InputFileError(
            f"{where} has no 'layers' (the layer range, e.g. \"0-5\"); it has: "
            f"{', '.join(sorted(map(str, row))) or 'no keys'}"
        )
    span = row.pop("layers")
    m = re.fullmatch(r"(\d+)(?:-(\d+))?", span.strip()) if isinstance(span, str) else None
    if not m:
        raise InputFileError(f'{where}: \'layers\' must be "first-last" (e.g. "0-5"), got {span!r}')
    first, last = int(m.group(1)), int(m.group(2) or m.group(1))
    if not 0 <= first <= last < num_layers:
        raise InputFileError(
            f"{where}: layer range {first}-{last} is outside 0-{num_layers - 1} (the model has "
            f"{num_layers} layers)"
        )
    try:
        return first, last, policy_from_row(row)
    except ValueError as err:
        raise InputFileError(f"{where}: {err}") from None


def policy_from_row(row: dict) -> CachePolicy:
    """One layer policy from a table row {"kind": ..., settings...}. Raises SmartKVError for an
    unknown kind, a setting the kind does not have (naming the valid ones) or a value of the
    wrong type or range."""
    if not isinstance(row, dict):
        raise SmartKVError(f"a policy row must be an object {_ROW_SHAPE}, got {row!r}")
    row = dict(row)
    kind = row.pop("kind", "full")
    if not isinstance(kind, str):
        raise SmartKVError(
            f"'kind' must be a policy name ({', '.join(POLICY_KINDS)}), got {kind!r}"
        )
    try:
        cls = policy_class(kind)
    except ValueError as err:
        raise SmartKVError(str(err)) from None
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in sorted(set(row) - set(fields)):
        if key in _LEGACY_DEFAULTS and row[key] == _LEGACY_DEFAULTS[key]:
            del row[key]
            continue
        raise SmartKVError(
            f"policy {cls.kind!r} has no setting {key!r}; valid: kind, {', '.join(sorted(fields))}"
        )
    for key, value in row.items():
        _check_setting(cls.kind, key, value, str(fields[key].type))
    try:
        return cls(**row)
    except ValueError as err:
        raise SmartKVError(f"policy {cls.kind!r}: {err}") from None


_SETTING_TYPES = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
    "bool": lambda v: isinstance(v, bool),
    "None": lambda v: v is None,
}
_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "None": "null"}


def _check_setting(kind: str, key: str, value: object, annotation: str) -> None:
    """SmartKVError unless `value` has a type the field's annotation ("int | None") allows."""
    names = [part.strip() for part in annotation.split("|")]
    if all(n in _SETTING_TYPES for n in names) and not any(_SETTING_TYPES[n](value) for n in names):
        want = " or ".join(_TYPE_WORDS.get(n, n) for n in names)
        raise SmartKVError(f"policy {kind!r}: setting {key!r} must be {want}, got {value!r}")


def seed_hybrid(num_layers: int, context: int, memory_fraction: float) -> PolicyConfig:
    """The seed's hybrid rule scaled to the model's depth and a memory budget.

    The first sixth of the layers keep 32 recent tokens + 4 sinks (their keys are
    short-lived), the last sixth keep recent tokens only, the middle layers are gated and
    share the rest of the budget (`memory_fraction` of the full cache at `context` tokens).
    """
    edge = max(1, round(num_layers / 6))
    total = int(memory_fraction * context * num_layers)
    early = WindowPolicy(capacity=36, n_sink=4)
    deep_cap = max(16, min(64, total // num_layers))
    deep = RecentPolicy(capacity=deep_cap)
    n_mid = num_layers - 2 * edge
    mid_cap = (total - edge * (early.capacity + deep_cap)) // max(n_mid, 1)
    if mid_cap < 48:
        raise ValueError(
            f"a budget of {memory_fraction:.4f} x {context} tokens is too small for the hybrid "
            f"rule ({mid_cap} slots per gated layer)"
        )
    mid = GatedPolicy(capacity=mid_cap, n_sink=4, recent=32, margin=2.0)
    layers = (early,) * edge + (mid,) * n_mid + (deep,) * edge
    return PolicyConfig(layers=layers, name="hybrid")


def check_budget(context: int, memory_fraction: float | None = None) -> None:
    """Raise SmartKVError unless context >= 1 and memory_fraction (if given) is in (0, 1]."""
    check_range("context", context, 1)
    if memory_fraction is not None:
        check_range("memory_fraction", memory_fraction, 0, 1, low_open=True)


def budget_effective(
    policy: PolicyConfig, length: int, chunk: int = 1, windows: tuple[int, ...] = ()
) -> bool:
    """Whether the policy's budget can change what any query reads when `length` tokens are
    fed `chunk` at a time (the last ones, say generated tokens, one at a time: chunk 1).

    A query reads the cache plus its own chunk, so a layer whose capacity is at least the
    position where the last chunk starts never drops a token a query would read; the budget
    takes effect only when some layer holds fewer slots than that (and, for a layer with an
    attention window W, fewer than W: its native cache). False: the results are the native
    cache's whatever the memory fraction says.
    """
    check_range("length", length, 1)
    check_range("chunk", chunk, 1)
    last_start = (length - 1) // chunk * chunk
    layers = policy.resolve(length, windows).layers
    return any(p.capacity < min(last_start, p.window or last_start) for p in layers)


def pyramid_capacities(
    num_layers: int, context: int, memory_fraction: float, window: int = 32, beta: float = 20.0
) -> list[int]:
    """PyramidKV's per-layer slots: falling linearly from the first layer to the last, the
    last keeping 1/beta of the mean share, their mean the share `memory_fraction * context`;
    the first at most `context - window` (the rest moved to the last). Uniform where the
    share is too small for a pyramid (as PyramidKV falls back to SnapKV)."""
    share = memory_fraction * context
    low, high = share / beta, 2 * share - share / beta
    if high > context - window:
        high = context - window
        low = 2 * share - high
    if num_layers < 2 or not context >= high >= low >= window:
        return [max(8, round(share))] * num_layers
    step = (high - low) / (num_layers - 1)
    return [max(8, round(high - i * step)) for i in range(num_layers)]


def make_policy(
    name: str, num_layers: int, context: int, memory_fraction: float = 1.0
) -> PolicyConfig:
    """A policy by name at `memory_fraction` of the full cache for `context` tokens.

    name: "hybrid" (the seed's rule), a policy kind applied to every layer (with
    "gated-only" an alias of "gated"), or a path to a JSON policy table. Raises SmartKVError
    for an unknown name, a memory fraction outside (0, 1] or a context < 1.
    """
    check_budget(context, memory_fraction)
    if name.endswith(".json"):
        return PolicyConfig.from_file(name, num_layers)
    if name == "hybrid":
        return seed_hybrid(num_layers, context, memory_fraction)
    if name == "pyramidkv":
        caps = pyramid_capacities(num_layers, context, memory_fraction)
        return PolicyConfig(tuple(SnapKVPolicy(capacity=c) for c in caps), name="pyramidkv")
    kind = "gated" if name == "gated-only" else name
    if kind == "full":
        return PolicyConfig.uniform(num_layers)
    try:
        cls = policy_class(kind)
    except ValueError:
        raise SmartKVError(
            f"unknown policy {name!r}; use hybrid, gated-only, pyramidkv, "
            f"{', '.join(POLICY_KINDS)} "
            "or a .json table"
        ) from None
    cap = max(8, int(memory_fraction * context))
    settings = {"margin": 2.0} if kind == "gated" else {}
    return PolicyConfig.uniform(num_layers, cls(capacity=cap, **settings))

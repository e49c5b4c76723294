"""The per-layer policy table: which strategy (smartkv_jax/policy.py) manages each layer's
cache, its JSON form, and the library's named tables (docs/design.md: budget, the cache).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from .policy import (
    POLICY_KINDS,
    CachePolicy,
    FullPolicy,
    GatedPolicy,
    RecentPolicy,
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

    def resolve(self, max_len: int) -> PolicyConfig:
        """Fill capacity=None with `max_len` and cap every capacity at `max_len`."""
        return dataclasses.replace(
            self,
            layers=tuple(
                dataclasses.replace(p, capacity=min(p.capacity or max_len, max_len))
                for p in self.layers
            ),
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

    def slots(self, max_len: int) -> int:
        """Total slots per (batch, KV head) over all layers at sequence length `max_len`."""
        return sum(p.capacity for p in self.resolve(max_len).layers)

    def memory_fraction(self, max_len: int) -> float:
        """KV bytes of this policy over the full cache's at sequence length `max_len`."""
        return self.slots(max_len) / (max_len * len(self.layers))

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
        return json.dumps({"name": self.name, "layers": rows}, indent=2)

    @classmethod
    def from_json(cls, text: str, num_layers: int) -> PolicyConfig:
        """Parse a table written by `to_json` (layer ranges "a-b" must cover every layer)."""
        data = json.loads(text)
        layers: list[CachePolicy | None] = [None] * num_layers
        for row in data["layers"]:
            row = dict(row)
            m = re.fullmatch(r"(\d+)-(\d+)", str(row.pop("layers")))
            if not m:
                raise ValueError("each row needs 'layers': 'first-last'")
            a, b = int(m.group(1)), int(m.group(2))
            if not 0 <= a <= b < num_layers:
                raise ValueError(f"layer range {a}-{b} is outside 0-{num_layers - 1}")
            policy = policy_from_row(row)
            for i in range(a, b + 1):
                layers[i] = policy
        missing = [i for i, p in enumerate(layers) if p is None]
        if missing:
            raise ValueError(f"policy table does not cover layers {missing}")
        return cls(layers=tuple(layers), name=data.get("name", "custom"))

    @classmethod
    def from_file(cls, path: str | Path, num_layers: int) -> PolicyConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"policy file not found: {path}")
        return cls.from_json(path.read_text(), num_layers)


def policy_from_row(row: dict) -> CachePolicy:
    """One layer policy from a table row {"kind": ..., settings...}."""
    row = dict(row)
    cls = policy_class(row.pop("kind", "full"))
    valid = {f.name for f in dataclasses.fields(cls)}
    for key in sorted(set(row) - valid):
        if key in _LEGACY_DEFAULTS and row[key] == _LEGACY_DEFAULTS[key]:
            del row[key]
            continue
        raise ValueError(
            f"policy {cls.kind!r} has no setting {key!r}; valid: kind, {', '.join(sorted(valid))}"
        )
    return cls(**row)


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


def make_policy(
    name: str, num_layers: int, context: int, memory_fraction: float = 1.0
) -> PolicyConfig:
    """A policy by name at `memory_fraction` of the full cache for `context` tokens.

    name: "hybrid" (the seed's rule), a policy kind applied to every layer (with
    "gated-only" an alias of "gated"), or a path to a JSON policy table.
    """
    if name.endswith(".json"):
        return PolicyConfig.from_file(name, num_layers)
    if name == "hybrid":
        return seed_hybrid(num_layers, context, memory_fraction)
    kind = "gated" if name == "gated-only" else name
    if kind == "full":
        return PolicyConfig.uniform(num_layers)
    try:
        cls = policy_class(kind)
    except ValueError:
        raise ValueError(
            f"unknown policy {name!r}; use hybrid, gated-only, {', '.join(POLICY_KINDS)} "
            "or a .json table"
        ) from None
    cap = max(8, int(memory_fraction * context))
    settings = {"margin": 2.0} if kind == "gated" else {}
    return PolicyConfig.uniform(num_layers, cls(capacity=cap, **settings))

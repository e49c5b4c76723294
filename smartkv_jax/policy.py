"""Eviction policies: per-layer ranking rules over the cache pytree, and the per-layer table.

A policy manages one layer's fixed-shape cache with pure functions of fixed shapes:

- `new_scores`: the score stored with each incoming token (what the policy ranks by later);
- `ranks`: a float rank per slot at time t; when a token needs a slot the lowest-ranked slot
  is the victim. Empty slots rank -inf; protected slots (sinks, the recent window) rank above
  every unprotected one, newest first, so a new protected token always finds room;
- `visible_pos`: slot positions as attention sees them (-1 hides a slot; gated policies hide
  slots whose predicted life has run out even before they are overwritten);
- `update_scores`: attention-driven policies (H2O, TOVA, SnapKV) refresh scores from the
  attention the new queries paid.

Adding a policy: add its name to POLICY_KINDS and a branch to the functions below.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp

POLICY_KINDS = (
    "full",  # every token kept (capacity = sequence length)
    "window",  # StreamingLLM: n_sink first positions + the most recent tokens
    "recent",  # the most recent tokens only
    "gated",  # learned gates: predicted expiry, or predicted life discounted by age
    "oracle",  # as gated, with the true log4 lifespans (from labels) as scores
    "h2o",  # accumulated attention (heavy hitters) + recent window
    "tova",  # attention of the newest query + recent window
    "snapkv",  # pooled attention from the last queries of each prefill chunk + recent window
    "knorm",  # lowest key norm kept + recent window
    "random",  # random keep + sinks and recent window
)
ATTENTION_SCORED = ("h2o", "tova", "snapkv")
LIFE_SCORED = ("gated", "oracle")

_SINK_RANK = 2.0e7  # + pos: sinks outrank everything
_RECENT_RANK = 1.0e7  # + pos: protected recent tokens, newest first
_LIFE_CAP = 1.0e6  # predicted expiry is clipped below the protected ranks


@dataclasses.dataclass(frozen=True)
class LayerPolicy:
    """How one layer's cache is managed.

    capacity: slots per (batch, KV head); None = as long as the whole sequence.
    n_sink:   first positions never evicted (window, gated, oracle, h2o, knorm, random).
    recent:   most recent tokens never evicted (all but full/tova).
    margin:   gated/oracle: a key expires at pos + margin * 4**score.
    discount: gated/oracle: None ranks slots by that expiry; a number g ranks them by
        score - g * log4(1 + age) instead. Under expiry a key predicted to live past the
        label cap is still dropped once pos + margin * 4**cap has passed, so a detail that only
        a late question reads (a needle) is lost in a long prompt; a discount keeps keys that
        are predicted long-lived as they age, at a cost of g per log4 of their age.
    mask_expired: gated/oracle: hide expired slots from attention before they are evicted
        (off by default: on SmolLM2 it made even the oracle worse than a plain window).
    obs_window, pool: snapkv: queries observed per chunk and max-pool width.
    """

    kind: str = "full"
    capacity: int | None = None
    n_sink: int = 4
    recent: int = 32
    margin: float = 1.0
    discount: float | None = None
    mask_expired: bool = False
    obs_window: int = 32
    pool: int = 7

    def __post_init__(self) -> None:
        if self.kind not in POLICY_KINDS:
            raise ValueError(f"unknown policy {self.kind!r}; known: {', '.join(POLICY_KINDS)}")
        if self.capacity is not None and self.capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {self.capacity}")
        bad_discount = self.discount is not None and self.discount < 0
        if self.n_sink < 0 or self.recent < 0 or self.margin <= 0 or bad_discount:
            raise ValueError(f"invalid policy settings: {self}")

    def describe(self) -> str:
        cap = "all" if self.capacity is None else str(self.capacity)
        life = f"margin {self.margin}" if self.discount is None else f"discount {self.discount}"
        extra = {
            "window": f"sinks {self.n_sink}",
            "gated": f"{life}, sinks {self.n_sink}, recent {self.recent}",
            "oracle": f"{life}, sinks {self.n_sink}, recent {self.recent}",
        }.get(self.kind, "" if self.kind in ("full", "recent") else f"recent {self.recent}")
        return f"{self.kind}({cap} slots{', ' + extra if extra else ''})"


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    """Per-layer policy table: `layers[i]` manages layer i."""

    layers: tuple[LayerPolicy, ...]
    name: str = "custom"

    @classmethod
    def uniform(cls, num_layers: int, policy: LayerPolicy | None = None) -> PolicyConfig:
        p = policy or LayerPolicy()
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

    def groups(self) -> list[tuple[int, int, LayerPolicy]]:
        """Maximal runs of consecutive layers with the same policy: (start, end, policy)."""
        out: list[tuple[int, int, LayerPolicy]] = []
        for i, p in enumerate(self.layers):
            if out and out[-1][2] == p:
                out[-1] = (out[-1][0], i + 1, p)
            else:
                out.append((i, i + 1, p))
        return out

    @property
    def needs_gates(self) -> bool:
        return any(p.kind == "gated" for p in self.layers)

    @property
    def needs_oracle(self) -> bool:
        return any(p.kind == "oracle" for p in self.layers)

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
        return json.dumps(
            {
                "name": self.name,
                "layers": [
                    {"layers": f"{a}-{b - 1}", **dataclasses.asdict(p)} for a, b, p in self.groups()
                ],
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str, num_layers: int) -> PolicyConfig:
        """Parse a table written by `to_json` (layer ranges "a-b" must cover every layer)."""
        data = json.loads(text)
        layers: list[LayerPolicy | None] = [None] * num_layers
        for row in data["layers"]:
            row = dict(row)
            m = re.fullmatch(r"(\d+)-(\d+)", str(row.pop("layers")))
            if not m:
                raise ValueError("each row needs 'layers': 'first-last'")
            a, b = int(m.group(1)), int(m.group(2))
            if not 0 <= a <= b < num_layers:
                raise ValueError(f"layer range {a}-{b} is outside 0-{num_layers - 1}")
            for i in range(a, b + 1):
                layers[i] = LayerPolicy(**row)
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


def new_scores(
    policy: LayerPolicy,
    pos_BC: jax.Array,
    k_pre_BKCD: jax.Array,
    given_BKC: jax.Array | None,
) -> jax.Array:
    """Score stored with each new token, [B, K, C] float32.

    `given_BKC` carries scores computed outside the policy: gate predictions (gated), true
    log4 lifespans (oracle) or the attention the chunk's queries paid (h2o, tova, snapkv).
    """
    b, kh, c, _ = k_pre_BKCD.shape
    shape = (b, kh, c)
    if policy.kind in LIFE_SCORED + ATTENTION_SCORED:
        if given_BKC is None:
            raise ValueError(f"policy {policy.kind!r} needs scores for new tokens")
        return given_BKC.astype(jnp.float32)
    if policy.kind == "knorm":
        return -jnp.linalg.norm(k_pre_BKCD.astype(jnp.float32), axis=-1)
    if policy.kind == "random":
        heads = jnp.arange(kh, dtype=jnp.uint32)[None, :, None]
        seed = pos_BC.astype(jnp.uint32)[:, None, :] * jnp.uint32(2654435761) + heads * 97
        return _hash_uniform(seed)
    return jnp.broadcast_to(pos_BC[:, None, :], shape).astype(jnp.float32)


def _hash_uniform(x: jax.Array) -> jax.Array:
    """A cheap deterministic hash of uint32 to [0, 1)."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    x = x ^ (x >> 16)
    return (x >> 8).astype(jnp.float32) / float(1 << 24)


def _expiry(policy: LayerPolicy, pos: jax.Array, score: jax.Array) -> jax.Array:
    life = policy.margin * jnp.power(4.0, jnp.clip(score, -2.0, 10.0))
    return jnp.minimum(pos.astype(jnp.float32) + life, _LIFE_CAP)


def ranks(policy: LayerPolicy, pos: jax.Array, score: jax.Array, t_B: jax.Array) -> jax.Array:
    """Rank of each slot (or new token) at time t_B (the newest position per row).

    pos, score: [B, K, N] (N slots or new tokens). Returns [B, K, N] float32.
    """
    t = t_B[:, None, None]
    p = pos.astype(jnp.float32)
    if policy.kind in ("full", "recent"):
        base = p
    elif policy.kind == "window":
        base = jnp.where(pos < policy.n_sink, _SINK_RANK + p, p)
    else:
        base = score
        if policy.kind in LIFE_SCORED and policy.discount is None:
            base = _expiry(policy, pos, score)
        elif policy.kind in LIFE_SCORED:
            age = jnp.maximum(t - p, 0.0)
            base = score - policy.discount * jnp.log1p(age) / jnp.log(4.0)
        recent = pos > t - policy.recent
        base = jnp.where(recent, _RECENT_RANK + p, base)
        if policy.kind != "tova":
            base = jnp.where(pos < policy.n_sink, _SINK_RANK + p, base)
    return jnp.where(pos >= 0, base, -jnp.inf)


def visible_pos(policy: LayerPolicy, pos: jax.Array, score: jax.Array, t_B: jax.Array) -> jax.Array:
    """Slot positions as attention sees them at time t_B; -1 hides a slot."""
    if policy.kind not in LIFE_SCORED or not policy.mask_expired:
        return pos
    t = t_B[:, None, None]
    protected = (pos < policy.n_sink) | (pos > t - policy.recent)
    alive = protected | (_expiry(policy, pos, score) >= t.astype(jnp.float32))
    return jnp.where(alive, pos, -1)


def update_scores(policy: LayerPolicy, score_BKS: jax.Array, mass_BKS: jax.Array) -> jax.Array:
    """New cache-slot scores after a chunk, from the attention mass its queries paid."""
    if policy.kind == "h2o":
        return score_BKS + mass_BKS
    if policy.kind == "tova":
        return mass_BKS
    if policy.kind == "snapkv":
        return jnp.maximum(score_BKS, mass_BKS)
    return score_BKS


def seed_hybrid(num_layers: int, context: int, memory_fraction: float) -> PolicyConfig:
    """The seed's hybrid rule scaled to the model's depth and a memory budget.

    The first sixth of the layers keep 32 recent tokens + 4 sinks (their keys are
    short-lived), the last sixth keep recent tokens only, the middle layers are gated and
    share the rest of the budget (`memory_fraction` of the full cache at `context` tokens).
    """
    edge = max(1, round(num_layers / 6))
    total = int(memory_fraction * context * num_layers)
    early = LayerPolicy("window", capacity=36, n_sink=4)
    deep_cap = max(16, min(64, total // num_layers))
    deep = LayerPolicy("recent", capacity=deep_cap)
    n_mid = num_layers - 2 * edge
    mid_cap = (total - edge * (early.capacity + deep_cap)) // max(n_mid, 1)
    if mid_cap < 48:
        raise ValueError(
            f"a budget of {memory_fraction:.4f} x {context} tokens is too small for the hybrid "
            f"rule ({mid_cap} slots per gated layer)"
        )
    mid = LayerPolicy("gated", capacity=mid_cap, n_sink=4, recent=32, margin=2.0)
    layers = (early,) * edge + (mid,) * n_mid + (deep,) * edge
    return PolicyConfig(layers=layers, name="hybrid")


def make_policy(
    name: str, num_layers: int, context: int, memory_fraction: float = 1.0
) -> PolicyConfig:
    """A policy by name at `memory_fraction` of the full cache for `context` tokens.

    name: "hybrid" (the seed's rule), a kind from POLICY_KINDS applied to every layer (with
    "gated-only" an alias of "gated"), or a path to a JSON policy table.
    """
    if name.endswith(".json"):
        return PolicyConfig.from_file(name, num_layers)
    if name == "hybrid":
        return seed_hybrid(num_layers, context, memory_fraction)
    kind = "gated" if name == "gated-only" else name
    if kind == "full":
        return PolicyConfig.uniform(num_layers)
    if kind not in POLICY_KINDS:
        raise ValueError(
            f"unknown policy {name!r}; use hybrid, gated-only, {', '.join(POLICY_KINDS)} "
            "or a .json table"
        )
    cap = max(8, int(memory_fraction * context))
    margin = 2.0 if kind == "gated" else 1.0
    return PolicyConfig.uniform(num_layers, LayerPolicy(kind, capacity=cap, margin=margin))

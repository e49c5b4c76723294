"""Eviction policies as frozen strategy dataclasses behind one protocol (docs/design.md: the
cache, how to add a policy).

A policy manages one layer's fixed-shape cache with pure functions of fixed shapes. The model
calls the protocol below and never names a policy:

- `visible(pos, score, t_B)`: slot positions as attention sees them (-1 hides a slot);
- `chunk_scores(view)`: the scores of the cache slots after a chunk's attention, and the
  score each of the chunk's tokens is stored with (from `initial_scores` and, for
  attention-scored policies, `update_scores`);
- `ranks(pos, score, t_B)`: a float rank per slot or new token at time t_B; when a token
  needs a slot the lowest-ranked one is the victim. Empty slots rank -inf; protected slots
  (sinks, the recent window) rank above every unprotected one, newest first, so a new
  protected token always finds room.

A policy that needs a side input per layer (the gates, the oracle's true lifespans) names it
in `needs`; the model hands each layer its slice of that input in `ChunkView.aux`.

Adding a policy: subclass `CachePolicy` (or `ProtectedPolicy`), set `kind`, override what
differs, and register the class in `POLICY_CLASSES`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from .attention import AttentionRule, attention_mass
from .cache import LayerCache
from .context_scores import (
    ContextView,
    expected_attention,
    expected_attention_scores,
    head_adaptive_keep,
    keydiff_scores,
    max_pool_slots,
    per_head_keep,
    query_statistics,
)
from .gates import apply_layer

_SINK_RANK = 2.0e7  # + pos: sinks outrank everything
_RECENT_RANK = 1.0e7  # + pos: protected recent tokens, newest first
_LIFE_CAP = 1.0e6  # predicted expiry is clipped below the protected ranks
UNLABELLED_LIFE = 10.0  # oracle score (log4) of a position its labels do not cover: kept


@dataclasses.dataclass(frozen=True)
class ChunkView:
    """What a layer's policy may read about a chunk of C new tokens (one layer, traced).

    cache: the layer's cache before the chunk. visible_BKS: its slot positions as attention
    saw them. q_BHCD, k_BKCD: queries and keys after RoPE; k_pre_BKCD: keys before RoPE.
    pos_BC: positions (-1 = padding); t_B: newest position per row. lse_BHC: log-sum-exp of
    the chunk's attention logits over cache + chunk. aux: this layer's side input (`needs`).
    rule: how the layer's queries see keys (scale, window). v_BKCD: the chunk's values.
    """

    cache: LayerCache
    visible_BKS: jax.Array
    q_BHCD: jax.Array
    k_BKCD: jax.Array
    k_pre_BKCD: jax.Array
    pos_BC: jax.Array
    t_B: jax.Array
    lse_BHC: jax.Array
    aux: Any = None
    rule: AttentionRule | None = None
    v_BKCD: jax.Array | None = None

    @property
    def pos_BKC(self) -> jax.Array:
        b, kh, c, _ = self.k_pre_BKCD.shape
        return jnp.broadcast_to(self.pos_BC[:, None, :], (b, kh, c))


@dataclasses.dataclass(frozen=True)
class CachePolicy:
    """Base strategy: tokens ranked by position, so the oldest is evicted first.

    capacity: slots per (batch, KV head); None = as long as the whole sequence.
    window: the attention window W the model itself gives the layer (0: global; set by
        `PolicyConfig.for_model`): a slot older than W positions is never read again, so it
        ranks as empty.
    """

    kind: ClassVar[str] = ""
    needs: ClassVar[str | None] = None  # name of the per-layer side input read from aux
    capacity: int | None = None
    window: int = 0

    def __post_init__(self) -> None:
        if self.capacity is not None and self.capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {self.capacity}")
        if self.window < 0:
            raise ValueError(f"window must be >= 0, got {self.window}")

    def initial_scores(self, view: ChunkView) -> jax.Array:
        """Score stored with each new token, [B, K, C] float32 (default: its position)."""
        return view.pos_BKC.astype(jnp.float32)

    def update_scores(self, score_BKS: jax.Array, mass_BKS: jax.Array) -> jax.Array:
        """Slot scores after the chunk's queries paid attention mass_BKS to them."""
        return score_BKS

    def chunk_scores(self, view: ChunkView) -> tuple[jax.Array, jax.Array]:
        """(slot scores [B, K, S] after the chunk, new tokens' scores [B, K, C])."""
        return view.cache.score, self.initial_scores(view)

    def context_scores(self, view: ContextView) -> jax.Array:
        """Slot scores [B, K, S] when a whole prefilled context is compressed at once (the
        oneshot protocol); default: the slot's position, as `initial_scores`."""
        return view.cache.pos.astype(jnp.float32)

    def context_keep(self, rank_BKS: jax.Array, capacity: jax.Array) -> jax.Array:
        """Which slots a oneshot compression keeps [B, K, S] when each head's share is
        `capacity` (traced; default: each head's `capacity` best ranked)."""
        return per_head_keep(rank_BKS, capacity)

    def base_ranks(self, pos: jax.Array, score: jax.Array, t_B: jax.Array) -> jax.Array:
        """Rank of occupied slots; `ranks` adds the empty-slot rule."""
        return pos.astype(jnp.float32)

    def ranks(self, pos: jax.Array, score: jax.Array, t_B: jax.Array) -> jax.Array:
        """Rank of each slot (or new token) at time t_B, [B, K, N] float32 (pos, score
        [B, K, N]); empty slots (pos -1), and slots out of the layer's window, rank -inf."""
        live = pos >= 0
        if self.window:
            live &= pos > t_B[:, None, None] - self.window
        return jnp.where(live, self.base_ranks(pos, score, t_B), -jnp.inf)

    def visible(self, pos: jax.Array, score: jax.Array, t_B: jax.Array) -> jax.Array:
        """Slot positions as attention sees them at time t_B; -1 hides a slot."""
        return pos

    def settings(self) -> str:
        """The policy's settings besides its capacity, for tables ("" if none)."""
        return ""

    def describe(self) -> str:
        cap = "all" if self.capacity is None else str(self.capacity)
        window = f"sliding window {self.window}" if self.window else ""
        extra = ", ".join(part for part in (self.settings(), window) if part)
        return f"{self.kind}({cap} slots{', ' + extra if extra else ''})"


@dataclasses.dataclass(frozen=True)
class FullPolicy(CachePolicy):
    """Every token kept (capacity = sequence length)."""

    kind: ClassVar[str] = "full"


@dataclasses.dataclass(frozen=True)
class RecentPolicy(CachePolicy):
    """The most recent tokens only."""

    kind: ClassVar[str] = "recent"


@dataclasses.dataclass(frozen=True)
class WindowPolicy(CachePolicy):
    """StreamingLLM: the n_sink first positions and the most recent tokens."""

    kind: ClassVar[str] = "window"
    n_sink: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_sink < 0:
            raise ValueError(f"invalid policy settings: {self}")

    def base_ranks(self, pos, score, t_B):
        p = pos.astype(jnp.float32)
        return jnp.where(pos < self.n_sink, _SINK_RANK + p, p)

    def settings(self) -> str:
        return f"sinks {self.n_sink}"


@dataclasses.dataclass(frozen=True)
class ProtectedPolicy(CachePolicy):
    """Ranks by score, with the n_sink first positions and the `recent` newest tokens
    protected (never evicted). Subclasses say what the score is."""

    kind: ClassVar[str] = ""
    protect_sinks: ClassVar[bool] = True
    n_sink: int = 4
    recent: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_sink < 0 or self.recent < 0:
            raise ValueError(f"invalid policy settings: {self}")

    def score_ranks(self, pos, score, t_B) -> jax.Array:
        """Rank of an unprotected slot (default: its score)."""
        return score

    def base_ranks(self, pos, score, t_B):
        p = pos.astype(jnp.float32)
        base = self.score_ranks(pos, score, t_B)
        base = jnp.where(pos > t_B[:, None, None] - self.recent, _RECENT_RANK + p, base)
        if self.protect_sinks:
            base = jnp.where(pos < self.n_sink, _SINK_RANK + p, base)
        return base

    def settings(self) -> str:
        return f"recent {self.recent}"


@dataclasses.dataclass(frozen=True)
class KNormPolicy(ProtectedPolicy):
    """Keeps the keys of lowest norm (KNorm) besides sinks and the recent window."""

    kind: ClassVar[str] = "knorm"

    def initial_scores(self, view):
        return -jnp.linalg.norm(view.k_pre_BKCD.astype(jnp.float32), axis=-1)

    def context_scores(self, view):
        return -jnp.linalg.norm(view.k_pre_BKSD.astype(jnp.float32), axis=-1)


@dataclasses.dataclass(frozen=True)
class RandomPolicy(ProtectedPolicy):
    """A deterministic random keep, besides sinks and the recent window."""

    kind: ClassVar[str] = "random"

    def initial_scores(self, view):
        return _position_hash(view.pos_BKC)

    def context_scores(self, view):
        return _position_hash(view.cache.pos)


def _position_hash(pos_BKN: jax.Array) -> jax.Array:
    """A deterministic uniform [0, 1) per (position, KV head)."""
    heads = jnp.arange(pos_BKN.shape[1], dtype=jnp.uint32)[None, :, None]
    return _hash_uniform(pos_BKN.astype(jnp.uint32) * jnp.uint32(2654435761) + heads * 97)


def _hash_uniform(x: jax.Array) -> jax.Array:
    """A cheap deterministic hash of uint32 to [0, 1)."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    x = x ^ (x >> 16)
    return (x >> 8).astype(jnp.float32) / float(1 << 24)


@dataclasses.dataclass(frozen=True)
class LifespanPolicy(ProtectedPolicy):
    """Ranks keys by their (predicted or true) log4 lifespan score (docs/design.md: label).

    margin: a key expires at pos + margin * 4**score.
    discount: None ranks slots by that expiry; a number g ranks them by
        score - g * log4(1 + age) instead. Under expiry a key predicted to live past the
        label cap is still dropped once pos + margin * 4**cap has passed, so a detail that only
        a late question reads (a needle) is lost in a long prompt; a discount keeps keys that
        are predicted long-lived as they age, at a cost of g per log4 of their age.
    mask_expired: hide expired slots from attention before they are evicted (off by default:
        on SmolLM2 it made even the oracle worse than a plain window).
    adaptive: None gives each KV head its own `capacity`; a fraction alpha shares the layer's
        K * capacity slots among its heads by rank when a whole context is compressed at
        once (Ada-KV's rule, `head_adaptive_keep`: each head keeps at least alpha of its
        share). Streaming, each head's cache is its fixed share, so the field does nothing.
    """

    kind: ClassVar[str] = ""
    margin: float = 1.0
    discount: float | None = None
    mask_expired: bool = False
    adaptive: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        bad_share = self.adaptive is not None and not 0 <= self.adaptive <= 1
        if self.margin <= 0 or (self.discount is not None and self.discount < 0) or bad_share:
            raise ValueError(f"invalid policy settings: {self}")

    def context_keep(self, rank_BKS, capacity):
        if self.adaptive is None:
            return super().context_keep(rank_BKS, capacity)
        return head_adaptive_keep(rank_BKS, capacity, self.adaptive)

    def expiry(self, pos: jax.Array, score: jax.Array) -> jax.Array:
        life = self.margin * jnp.power(4.0, jnp.clip(score, -2.0, 10.0))
        return jnp.minimum(pos.astype(jnp.float32) + life, _LIFE_CAP)

    def score_ranks(self, pos, score, t_B):
        if self.discount is None:
            return self.expiry(pos, score)
        age = jnp.maximum(t_B[:, None, None] - pos.astype(jnp.float32), 0.0)
        return score - self.discount * jnp.log1p(age) / jnp.log(4.0)

    def visible(self, pos, score, t_B):
        if not self.mask_expired:
            return pos
        t = t_B[:, None, None]
        protected = (pos < self.n_sink) | (pos > t - self.recent)
        alive = protected | (self.expiry(pos, score) >= t.astype(jnp.float32))
        return jnp.where(alive, pos, -1)

    def settings(self) -> str:
        life = f"margin {self.margin}" if self.discount is None else f"discount {self.discount}"
        heads = "" if self.adaptive is None else f", heads share (alpha {self.adaptive})"
        return f"{life}, sinks {self.n_sink}, recent {self.recent}{heads}"


@dataclasses.dataclass(frozen=True)
class GatedPolicy(LifespanPolicy):
    """Learned gates: each key's score is its gate's predicted log4 lifespan. aux: the
    layer's gates (a `Gates` module whose leaves are one layer's, [K, ...])."""

    kind: ClassVar[str] = "gated"
    needs: ClassVar[str | None] = "gates"

    def initial_scores(self, view):
        return apply_layer(view.aux, view.k_pre_BKCD, view.pos_BC).astype(jnp.float32)

    def context_scores(self, view):
        pos_BS = jnp.max(view.cache.pos, axis=1)  # slot s holds position s in every head
        return apply_layer(view.aux, view.k_pre_BKSD, pos_BS).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class OraclePolicy(LifespanPolicy):
    """As gated, with true log4 lifespans as scores. aux: [B, K, T] true scores by position;
    positions past T (decoded tokens) get UNLABELLED_LIFE."""

    kind: ClassVar[str] = "oracle"
    needs: ClassVar[str | None] = "oracle"

    def initial_scores(self, view):
        return _true_life(view.aux, view.pos_BKC)

    def context_scores(self, view):
        return _true_life(view.aux, view.cache.pos)


def _true_life(life_BKT: jax.Array, pos_BKN: jax.Array) -> jax.Array:
    """The true log4 lifespan of each position; UNLABELLED_LIFE past the labels."""
    t = life_BKT.shape[-1]
    got = jnp.take_along_axis(life_BKT.astype(jnp.float32), jnp.clip(pos_BKN, 0, t - 1), axis=-1)
    return jnp.where(pos_BKN < t, got, UNLABELLED_LIFE)


@dataclasses.dataclass(frozen=True)
class AttentionPolicy(ProtectedPolicy):
    """Scores from the attention the chunk's observed queries pay (H2O, TOVA, SnapKV)."""

    kind: ClassVar[str] = ""

    def observed(self, pos_BC: jax.Array, t_B: jax.Array) -> jax.Array:
        """Which of the chunk's queries feed the scores, [B, C] bool (default: all)."""
        return pos_BC >= 0

    def new_token_scores(self, mass_BKC: jax.Array) -> jax.Array:
        return mass_BKC

    def chunk_scores(self, view):
        weight_BC = self.observed(view.pos_BC, view.t_B).astype(jnp.float32)
        v = view
        mass_BKS, mass_BKC = attention_mass(
            v.cache, v.visible_BKS, v.q_BHCD, v.k_BKCD, v.pos_BC, v.lse_BHC, weight_BC, v.rule
        )
        slots = self.update_scores(view.cache.score, mass_BKS)
        return slots, self.new_token_scores(mass_BKC).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class H2OPolicy(AttentionPolicy):
    """Heavy hitters: attention accumulated over every query, plus the recent window."""

    kind: ClassVar[str] = "h2o"

    def update_scores(self, score_BKS, mass_BKS):
        return score_BKS + mass_BKS

    def context_scores(self, view):
        return view.cache.score  # the context was prefilled under H2O's scoring


@dataclasses.dataclass(frozen=True)
class TOVAPolicy(AttentionPolicy):
    """Attention of the newest query only, plus the recent window (no sinks protected)."""

    kind: ClassVar[str] = "tova"
    protect_sinks: ClassVar[bool] = False

    def observed(self, pos_BC, t_B):
        return (pos_BC >= 0) & (pos_BC == t_B[:, None])

    def update_scores(self, score_BKS, mass_BKS):
        return mass_BKS

    def context_scores(self, view):
        return view.obs_mass_BKWS[:, :, -1]


@dataclasses.dataclass(frozen=True)
class SnapKVPolicy(AttentionPolicy):
    """Attention of the last obs_window queries of each chunk, max-pooled over `pool`
    neighbouring positions, plus the recent window."""

    kind: ClassVar[str] = "snapkv"
    obs_window: int = 32
    pool: int = 7

    def observed(self, pos_BC, t_B):
        return (pos_BC >= 0) & (pos_BC > t_B[:, None] - self.obs_window)

    def new_token_scores(self, mass_BKC):
        return max_pool_slots(mass_BKC, self.pool)

    def update_scores(self, score_BKS, mass_BKS):
        return jnp.maximum(score_BKS, mass_BKS)

    def context_scores(self, view):
        observed = jnp.sum(view.obs_mass_BKWS[:, :, -self.obs_window :], axis=2)
        return max_pool_slots(observed, self.pool)


@dataclasses.dataclass(frozen=True)
class AdaKVPolicy(SnapKVPolicy):
    """Ada-KV over SnapKV's scores: in a oneshot compression the layer's budget of
    K * capacity slots is shared by its KV heads, each keeping at least `alpha` of a head's
    share. Streaming, each head's cache is its fixed share, so it runs as SnapKV."""

    kind: ClassVar[str] = "adakv"
    alpha: float = 0.2

    def context_keep(self, rank_BKS, capacity):
        return head_adaptive_keep(rank_BKS, capacity, self.alpha)


@dataclasses.dataclass(frozen=True)
class KeyDiffPolicy(ProtectedPolicy):
    """KeyDiff: keeps the keys least similar to their head's mean key direction (after
    RoPE, as cached), besides sinks and the recent window; every slot is rescored against
    the new anchor after each chunk."""

    kind: ClassVar[str] = "keydiff"

    def chunk_scores(self, view):
        k = jnp.concatenate([view.cache.k, view.k_BKCD.astype(view.cache.k.dtype)], axis=2)
        live = jnp.concatenate([view.cache.pos >= 0, view.pos_BKC >= 0], axis=2)
        scores = keydiff_scores(k, live)
        s = view.cache.capacity
        return scores[..., :s], scores[..., s:]

    def context_scores(self, view):
        return keydiff_scores(view.cache.k, view.live_BKS)


@dataclasses.dataclass(frozen=True)
class ExpectedAttentionPolicy(ProtectedPolicy):
    """Expected Attention: the attention future queries are expected to pay each key, times
    its value's norm. Oneshot: the queries of the next `n_future` positions, modelled from
    the context's. Streaming: after each chunk every slot and new key is rescored with the
    statistics of the chunk's own queries (after RoPE, as the keys)."""

    kind: ClassVar[str] = "expected"
    n_future: int = 512

    def chunk_scores(self, view):
        c = view.cache
        k = jnp.concatenate([c.k, view.k_BKCD.astype(c.k.dtype)], axis=2)
        v = jnp.concatenate([c.v, view.v_BKCD.astype(c.v.dtype)], axis=2)
        live = jnp.concatenate([c.pos >= 0, view.pos_BKC >= 0], axis=2)
        mu, cov = query_statistics(view.q_BHCD, view.pos_BC >= 0)
        scores = expected_attention(k, v, live, mu, cov, view.rule.scale)
        return scores[..., : c.capacity], scores[..., c.capacity :]

    def context_scores(self, view):
        return expected_attention_scores(view, self.n_future)


POLICY_CLASSES: dict[str, type[CachePolicy]] = {
    cls.kind: cls
    for cls in (
        FullPolicy,
        WindowPolicy,
        RecentPolicy,
        GatedPolicy,
        OraclePolicy,
        H2OPolicy,
        TOVAPolicy,
        SnapKVPolicy,
        KNormPolicy,
        RandomPolicy,
        AdaKVPolicy,
        KeyDiffPolicy,
        ExpectedAttentionPolicy,
    )
}
POLICY_KINDS = tuple(POLICY_CLASSES)


def policy_class(kind: str) -> type[CachePolicy]:
    """The strategy class of a policy kind ("window", "gated", ...)."""
    if kind not in POLICY_CLASSES:
        raise ValueError(f"unknown policy {kind!r}; known: {', '.join(POLICY_KINDS)}")
    return POLICY_CLASSES[kind]

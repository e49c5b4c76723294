"""The oneshot protocol (as kvpress): a context is prefilled once with the whole cache, then
compressed to each policy's budget before the question is read, and the question is answered
by every compressed cache, one batch row per (policy, budget).

`prefill_context` runs the context under H2O's scoring with room for all of it (nothing is
evicted, so the cache equals the full one and each slot's score is the attention every
context query paid it), keeping the last `obs` queries and the statistics of the queries
before RoPE. `context_views` derives what each layer's policy reads, once; `select` turns
that into one row per policy: each global layer keeps the slots its policy ranks best
(`CachePolicy.context_scores`, `context_keep`); windowed layers keep their native caches.
`pack` makes a batch of rows one cache (`compress`: both, for every row; which rows share a
batch: oneshot_batches.py), and `answer` reads the question from there and decodes greedily.

Shapes: L layers, B rows, K KV heads, H query heads, S slots, W observation queries, D head
dim, R compressed rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from .attention import AttentionRule
from .cache import KVCache, LayerCache, init_cache
from .context_scores import ContextView
from .eviction import packed_indices
from .gates import Gates, layer_params
from .generate import GenerationResult, continue_generation
from .kernels import resolve_kernels
from .model import Transformer
from .policy import FullPolicy, H2OPolicy
from .policy_table import PolicyConfig
from .rope import rotate
from .sharding import model_mesh, place_cache, put_batch
from .step import chunk_step, split_model

DEFAULT_OBS = 64  # observation-window queries kept (SnapKV, TOVA, Ada-KV, PyramidKV)
N_SINK_STATS = 4  # first positions left out of the query statistics (attention sinks)
SIZE_STEP = 256  # compressed layers' slots are a multiple: few shapes, so few compiled programs


@dataclasses.dataclass
class PrefilledContext:
    """A context of `length` tokens in a cache that holds all of it (batch 1).

    q_obs_LBHWD: the last W context queries after RoPE; q_mean_LBHD, q_cov_LBHDD: the
    context queries' statistics before RoPE (positions >= N_SINK_STATS)."""

    cache: KVCache
    policy: PolicyConfig
    q_obs_LBHWD: jax.Array
    q_mean_LBHD: jax.Array
    q_cov_LBHDD: jax.Array
    length: int


def layer_inv_freqs(model: Transformer) -> jax.Array:
    """RoPE frequencies of every layer [L, D/2]."""
    return jnp.stack([model.inv_freq(model.cfg.window(i)) for i in range(model.cfg.num_layers)])


def unrotate(x_LBNCD: jax.Array, pos_BC: jax.Array, inv_LF: jax.Array) -> jax.Array:
    """Undo RoPE at positions pos_BC (per layer frequencies inv_LF)."""
    ang = (
        jnp.maximum(pos_BC, 0).astype(jnp.float32)[None, :, None, :, None]
        * inv_LF[:, None, None, None, :]
    )
    return rotate(x_LBNCD, jnp.cos(ang), -jnp.sin(ang))


@jax.jit
def _add_query_sums(sums, q_LBHCD, pos_BC, inv_LF):
    """Running (count [B], sum [L, B, H, D], sum of outer products [L, B, H, D, D]) of the
    chunk's valid queries before RoPE at positions >= N_SINK_STATS."""
    n, s1, s2 = sums
    q = unrotate(q_LBHCD, pos_BC, inv_LF) * (pos_BC >= N_SINK_STATS)[None, :, None, :, None]
    n = n + jnp.sum(pos_BC >= N_SINK_STATS, axis=1)
    return n, s1 + jnp.sum(q, axis=3), s2 + jnp.einsum("lbhcd,lbhce->lbhde", q, q)


def _probe_queries(q, k, k_pre):
    return q


def prefill_context(
    model: Transformer, context: Sequence[int], obs: int = DEFAULT_OBS, chunk: int = 512
) -> PrefilledContext:
    """Run `context` (token ids) through a cache that holds all of it; the last `obs`
    tokens form a chunk of their own, whose queries are kept."""
    cfg, t = model.cfg, len(context)
    obs = min(obs, t)
    capacity = -(-t // 256) * 256
    policy = PolicyConfig.uniform(cfg.num_layers, H2OPolicy(n_sink=0, recent=0))
    policy = policy.resolve(capacity, cfg.layer_windows)
    mesh = model_mesh(model)
    cache = init_cache(cfg, policy, 1, model.dtype, mesh=mesh)
    graph, state = split_model(model, cache)
    inv = layer_inv_freqs(model)
    h, d = cfg.num_heads, cfg.head_dim
    sums = (
        jnp.zeros(1),
        jnp.zeros((cfg.num_layers, 1, h, d)),
        jnp.zeros((cfg.num_layers, 1, h, d, d)),
    )
    bounds = list(range(0, t - obs, chunk)) + [t - obs]
    q_last = None
    for a, b in zip(bounds, bounds[1:] + [t]):
        width = chunk if b - a < chunk and a < t - obs else b - a
        tokens = np.zeros((1, width), np.int32)
        pos = np.full((1, width), -1, np.int32)
        tokens[0, : b - a], pos[0, : b - a] = context[a:b], np.arange(a, b)
        tokens, pos = put_batch(tokens, mesh), put_batch(pos, mesh)
        out = chunk_step(graph, state, policy, tokens, pos, cache, probe=_probe_queries)
        cache, q_last = out.cache, out.probes
        sums = _add_query_sums(sums, out.probes, pos, inv)
    n, s1, s2 = sums
    n = jnp.maximum(n, 1.0)[None, :, None, None]
    mean = s1 / n
    cov = s2 / n[..., None] - jnp.einsum("lbhd,lbhe->lbhde", mean, mean)
    return PrefilledContext(cache, policy, q_last, mean, cov, t)


def _layer_cache(cache: KVCache, layer: int) -> LayerCache:
    """One layer's slice of the cache (leaves [B, K, S, ...])."""
    for (a, b), g in zip(cache.bounds, cache.groups):
        if a <= layer < b:
            return jax.tree.map(lambda x, i=layer - a: x[i], g)
    raise IndexError(layer)


def observation_mass(lc: LayerCache, q_BHWD: jax.Array, t: int, rule: AttentionRule):
    """Attention [B, K, W, S] of the context's last W queries (positions t-W .. t-1) to each
    slot, summed over the KV group's heads."""
    b, h, w, d = q_BHWD.shape
    kh = lc.k.shape[1]
    qg = q_BHWD.reshape(b, kh, h // kh, w, d)
    logits = rule.logits(qg, lc.k, "bkgwd,bksd->bkgws")
    pos_BW = jnp.broadcast_to(jnp.arange(t - w, t, dtype=jnp.int32), (b, w))
    logits = jnp.where(rule.slot_mask(lc.pos, pos_BW), logits, -jnp.inf)
    return jnp.sum(jax.nn.softmax(logits, axis=-1), axis=2)


def context_view(
    model: Transformer, ctx: PrefilledContext, layer: int, gates: Gates | None = None
) -> ContextView:
    """What layer `layer`'s policy reads to compress the context (see ContextView)."""
    cfg = model.cfg
    lc = _layer_cache(ctx.cache, layer)
    window = cfg.window(layer)
    rule = AttentionRule(cfg.scale, window)
    inv = model.inv_freq(window)
    pos_BS = jnp.max(lc.pos, axis=1)
    k_pre = unrotate(lc.k[None], pos_BS, inv[None])[0]
    w = ctx.q_obs_LBHWD.shape[3]
    return (
        ContextView(
            cache=lc,
            k_pre_BKSD=k_pre,
            obs_mass_BKWS=observation_mass(lc, ctx.q_obs_LBHWD[layer], ctx.length, rule),
            q_mean_BHD=ctx.q_mean_LBHD[layer],
            q_cov_BHDD=ctx.q_cov_LBHDD[layer],
            inv_freq=inv,
            t_B=jnp.full((lc.pos.shape[0],), ctx.length - 1, jnp.int32),
            rule=rule,
            aux=None if gates is None else layer_params(gates, layer),
        )
        if w
        else None
    )


@partial(jax.jit, static_argnames="policy")
def _keep(policy, capacity_N: jax.Array, view: ContextView) -> tuple[jax.Array, jax.Array]:
    """(which slots [N, B, K, S] `policy` keeps at each of N capacities (slots per head), the
    most any one head keeps at each [N]): the slots are ranked once for all N, and the
    policy's own capacity is stripped, so one program serves every budget; a head-adaptive
    rule may give one head more than its capacity."""
    rank = policy.ranks(view.cache.pos, policy.context_scores(view), view.t_B)
    keep = jax.vmap(lambda c: policy.context_keep(rank, c))(capacity_N)
    return keep, jnp.max(jnp.sum(keep, axis=-1), axis=(1, 2))


@partial(jax.jit, static_argnames="size")
def _pack(lc: LayerCache, keep_RKS: jax.Array, size: int) -> LayerCache:
    """The slots of one layer's cache `lc` (batch 1) each of R rows keeps, packed into `size`
    slots per head (>= the most any head keeps): kept first, in position order; the rest
    empty. Returns the rows' layer [R, K, size, ...]."""
    idx = packed_indices(keep_RKS, size)  # [R, K, size]: kept slots first, in order
    took = jnp.arange(size) < jnp.sum(keep_RKS, axis=-1, keepdims=True)
    rows = jax.tree.map(lambda x: jnp.broadcast_to(x, (len(keep_RKS), *x.shape[1:])), lc)
    pick = partial(jnp.take_along_axis, indices=idx[..., None], axis=2)
    pos = jnp.where(took, jnp.take_along_axis(rows.pos, idx, axis=-1), -1)
    k, v = (jnp.where(took[..., None], pick(x), 0) for x in (rows.k, rows.v))  # empty: 0
    return LayerCache(k, v, pos, jnp.zeros(pos.shape, jnp.float32))


@dataclasses.dataclass
class Compressed:
    """The context compressed by each of R policies: `cache` (row r: policy r),
    `policy`: the table the rows are read and decoded under, kept_RL: slots kept per row
    and layer (summed over KV heads), native_L: slots of the model's own cache per layer
    (over KV heads) at the context's length."""

    cache: KVCache
    policy: PolicyConfig
    kept_RL: np.ndarray
    native_L: np.ndarray

    def memory_fractions(self) -> np.ndarray:
        """KV memory of each row over the native cache's, [R]."""
        return self.kept_RL.sum(1) / self.native_L.sum()


def context_views(
    model: Transformer, ctx: PrefilledContext, gates: Gates | None = None
) -> list[ContextView | None]:
    """Every global layer's ContextView (None for a windowed layer, which keeps its native
    cache): computed once per context, shared by every `compress` of it."""
    cfg = model.cfg
    return [
        None if cfg.window(i) else context_view(model, ctx, i, gates) for i in range(cfg.num_layers)
    ]


@dataclasses.dataclass
class Selection:
    """What each of R policies keeps of one context, before packing: keeps[layer]: which
    slots [R, K, S] each row keeps in each global layer; slots_R: the most slots one head of the
    row needs in any layer (its capacity scaled to the nominal length, or what a
    head-adaptive rule gave a head), room for the question and answer not included."""

    keeps: dict[int, jax.Array]
    slots_R: np.ndarray

    def sizes(self, room: int) -> np.ndarray:
        """Slots per head [R] a packed layer of each row takes with `room` free slots."""
        return -(-(self.slots_R + room) // SIZE_STEP) * SIZE_STEP


def select(
    model: Transformer,
    ctx: PrefilledContext,
    policies: Sequence[PolicyConfig],
    views: Sequence[ContextView | None],
    oracle_LKT: np.ndarray | None = None,
    size_length: int | None = None,
) -> Selection:
    """Each policy's choice of the context's slots in every global layer (`views`: from
    `context_views`). oracle_LKT: true log4 lifespans [L, K, T] (T >= the context's length)
    of the sample, which oracle layers rank by. size_length (>= the context's length;
    default: it): the rows' slot needs are reckoned as if the context were that long
    (capacities scaled up in proportion), so that contexts of slightly different lengths
    share cache shapes and compiled programs."""
    cfg = model.cfg
    rows = [p.resolve(ctx.length, cfg.layer_windows) for p in policies]
    scale = max(size_length or ctx.length, ctx.length) / ctx.length
    keeps = _keeps(rows, views, oracle_LKT, ctx.length)  # {layer: (keep [R, K, S], most [R])}
    most_LR = np.asarray(jax.device_get([most for _, most in keeps.values()]))
    caps_LR = np.array([[_capacity(r.layers[i], ctx.length) for r in rows] for i in keeps])
    need_LR = np.maximum(np.ceil(caps_LR * scale), most_LR).astype(np.int64)
    slots = need_LR.max(0) if len(keeps) else np.zeros(len(rows), np.int64)
    return Selection({i: keep for i, (keep, _) in keeps.items()}, slots)


def pack(
    model: Transformer,
    ctx: PrefilledContext,
    selection: Selection,
    rows: Sequence[int],
    room: int,
) -> Compressed:
    """Rows `rows` of a `selection` as one cache (batch row b: selection row rows[b]): each
    global layer holds what its row keeps, with `room` free slots for the question and
    answer; windowed layers keep their native caches.

    Every compressed layer gets the slot count of the largest row's need, so they form one
    cache group (one loop over the layers per decode step) whatever each row keeps per
    layer. The slots past what a row holds stay empty, so this changes no answer, and
    decoding many small groups (per-layer budgets, as PyramidKV's) costs more than the
    padding: a layer loop of its own each, and the model's weights restacked to match.
    Rows of unlike needs are best packed apart (`oneshot_batches.decode_batches`)."""
    cfg = model.cfg
    rows = list(rows)
    size = int(selection.sizes(room)[rows].max())
    compressed_L = [i in selection.keeps for i in range(cfg.num_layers)]
    table = _decode_table(ctx.policy, size)
    keeps = [
        selection.keeps[i][np.asarray(rows)] if compressed else None
        for i, compressed in enumerate(compressed_L)
    ]
    layers = [_layer_cache(ctx.cache, i) for i in range(cfg.num_layers)]
    bounds = tuple((a, b) for a, b, _ in table.groups())
    groups, counts_LR = _packed_groups(layers, keeps, size, len(rows), bounds)
    kept_LR = np.asarray(jax.device_get(counts_LR), np.int64)
    native = [
        cfg.num_kv_heads * ctx.length if compressed else kept_LR[i, 0]
        for i, compressed in enumerate(compressed_L)
    ]
    mesh = model_mesh(model)
    cache = place_cache(KVCache(groups, bounds, resolve_kernels("auto")), mesh)
    cache = dataclasses.replace(cache, mesh=mesh)  # a Pallas kernel then runs per shard
    return Compressed(cache, table, kept_LR.T, np.asarray(native))


def compress(
    model: Transformer,
    ctx: PrefilledContext,
    policies: Sequence[PolicyConfig],
    room: int,
    views: Sequence[ContextView | None],
    oracle_LKT: np.ndarray | None = None,
    size_length: int | None = None,
) -> Compressed:
    """One row per policy, in one cache: `select` then `pack` of every row (arguments as
    theirs)."""
    selection = select(model, ctx, policies, views, oracle_LKT, size_length)
    return pack(model, ctx, selection, range(len(policies)), room)


def _capacity(policy, length: int) -> int:
    """A resolved layer policy's slots per head for a context of `length` tokens."""
    return min(policy.capacity or length, length)


def _keeps(rows: Sequence[PolicyConfig], views, oracle_LKT, length: int) -> dict:
    """{global layer: (which slots [R, K, S] each row keeps, the most one of its heads keeps
    [R])} at the rows' capacities (resolved tables). The rows whose layer policy differs only
    in capacity (one policy at several budgets) share one `_keep`: their slots are scored and
    ranked once."""
    keeps = {}
    for i, view in enumerate(views):
        if view is None:
            continue
        groups: dict = {}  # the layer's policy without its capacity -> its rows
        for r, row in enumerate(rows):
            groups.setdefault(dataclasses.replace(row.layers[i], capacity=None), []).append(r)
        parts = []
        for policy, members in groups.items():
            caps = jnp.array([_capacity(rows[r].layers[i], length) for r in members], jnp.int32)
            parts.append(_keep(policy, caps, _view_for(policy, view, oracle_LKT, i)))
        order = np.argsort(np.concatenate(list(groups.values())))  # group order -> row order
        keep, most = (jnp.concatenate(x)[order] for x in zip(*parts))
        keeps[i] = (keep[:, 0], most)  # [R, 1, K, S] -> [R, K, S]: the context is one row
    return keeps


def _view_for(policy, view: ContextView, oracle_LKT: np.ndarray | None, layer: int):
    """`view` as layer `layer`'s policy reads it: an oracle layer's aux is the sample's true
    lifespans [1, K, T] of that layer (the shared views carry the gates)."""
    if policy.needs != "oracle":
        return view
    if oracle_LKT is None:
        raise ValueError(f"policy {policy.kind!r} needs the sample's true lifespans (oracle_LKT)")
    return dataclasses.replace(view, aux=jnp.asarray(oracle_LKT[layer], jnp.float32)[None])


def _decode_table(context_policy: PolicyConfig, size: int) -> PolicyConfig:
    """Windowed layers keep their native policy; the others keep everything their `size`
    slots hold (room for the question and answer included)."""
    out = [p if p.window else FullPolicy(capacity=size) for p in context_policy.layers]
    return PolicyConfig(tuple(out), name="oneshot")


@partial(jax.jit, static_argnames=("size", "n_rows", "bounds"))
def _packed_groups(layers, keeps, size: int, n_rows: int, bounds):
    """(the cache groups of `bounds`, each a stack [L, R, K, S, ...] of its layers; the
    slots each row holds per layer [L, R], summed over KV heads). Layer i is layers[i]
    (batch 1) packed to `size` slots as each of the R rows keeps it (keeps[i]: [R, K, S]),
    or, where keeps[i] is None (a windowed layer), the native cache in every row. One
    compiled program, which writes each packed layer into its group's stack."""
    rows = [
        _pack(lc, keep, size)
        if keep is not None
        else jax.tree.map(lambda x: jnp.repeat(x, n_rows, axis=0), lc)
        for lc, keep in zip(layers, keeps)
    ]
    counts_LR = jnp.stack([jnp.sum(lc.pos >= 0, axis=(1, 2)) for lc in rows])
    groups = tuple(jax.tree.map(lambda *ls: jnp.stack(ls), *rows[a:b]) for a, b in bounds)
    return groups, counts_LR


def answer(
    model: Transformer,
    compressed: Compressed,
    length: int,
    question: Sequence[int],
    max_new_tokens: int,
    stop_tokens: Sequence[int] | None = None,
) -> GenerationResult:
    """Read `question` (token ids) after the `length`-token context in every row, then
    decode up to `max_new_tokens` greedily."""
    rows = compressed.cache.groups[0].pos.shape[1]
    start = np.full(rows, length, np.int64)
    return continue_generation(
        model,
        compressed.cache,
        compressed.policy,
        [[list(question)] * rows],
        start,
        max_new_tokens,
        stop_tokens=stop_tokens,
        chunk=max(64, -(-len(question) // 64) * 64),  # few question widths: few compiles
        shrink=True,  # rows that answered drop out of the batch
    )

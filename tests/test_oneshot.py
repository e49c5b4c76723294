"""The oneshot protocol: a context prefilled once, compressed per policy, answered in one
batch (smartkv_jax/oneshot.py)."""

from __future__ import annotations

import dataclasses
import itertools

import jax
import numpy as np
import pytest

from smartkv_jax.generate import generate
from smartkv_jax.model import Transformer
from smartkv_jax.oneshot import (
    _layer_cache,
    answer,
    compress,
    context_view,
    context_views,
    pack,
    prefill_context,
    select,
)
from smartkv_jax.oneshot_batches import decode_batches
from smartkv_jax.policy_table import PolicyConfig, make_policy
from train.policy_names import parse_policy

from .conftest import tiny_config

CFG = dataclasses.replace(tiny_config(), max_position=2048)
T, OBS = 300, 16


@pytest.fixture(scope="module")
def setup():
    model = Transformer.init_random(CFG, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    context = rng.integers(0, CFG.vocab_size, T).tolist()
    question = rng.integers(0, CFG.vocab_size, 7).tolist()
    return model, context, question, prefill_context(model, context, obs=OBS, chunk=64)


def test_full_row_answers_as_generate(setup):
    model, context, question, ctx = setup
    want = generate(model, [question], 8, context=[context], stop_tokens=()).tokens[0]
    policies = [
        PolicyConfig.uniform(CFG.num_layers),
        make_policy("window", CFG.num_layers, T, 0.25),
    ]
    packed = compress(model, ctx, policies, room=32, views=context_views(model, ctx))
    got = answer(model, packed, T, question, 8, stop_tokens=()).tokens
    assert got[0] == want
    np.testing.assert_allclose(packed.memory_fractions(), [1.0, 75 / T])


def test_sliding_window_layers_keep_their_native_caches():
    """A model whose layers 0 and 2 attend over a 32-token window (as Gemma 3's): those
    layers keep the prefilled native cache in every row, only the global layer is
    compressed, and the full row answers as `generate` does."""
    cfg = dataclasses.replace(CFG, num_layers=3, layer_windows=(32, 0, 32))
    model = Transformer.init_random(cfg, jax.random.PRNGKey(1))
    rng = np.random.default_rng(1)
    context = rng.integers(0, cfg.vocab_size, T).tolist()
    question = rng.integers(0, cfg.vocab_size, 5).tolist()
    ctx = prefill_context(model, context, obs=OBS, chunk=64)
    policies = [PolicyConfig.uniform(3), make_policy("snapkv", 3, T, 0.25)]
    packed = compress(model, ctx, policies, room=16, views=context_views(model, ctx))
    for layer in (0, 2):
        native = np.asarray(_layer_cache(ctx.cache, layer).pos)[0]
        got = np.asarray(_layer_cache(packed.cache, layer).pos)
        np.testing.assert_array_equal(got, np.stack([native, native]))
        assert packed.kept_RL[1, layer] == cfg.num_kv_heads * 32
    assert packed.kept_RL[0, 1] == cfg.num_kv_heads * T
    assert packed.kept_RL[1, 1] == cfg.num_kv_heads * 75
    want = generate(model, [question], 6, context=[context], stop_tokens=()).tokens[0]
    assert answer(model, packed, T, question, 6, stop_tokens=()).tokens[0] == want


def test_window_keeps_sinks_and_the_newest(setup):
    model, _, _, ctx = setup
    window = make_policy("window", CFG.num_layers, T, 0.25)
    packed = compress(model, ctx, [window], room=8, views=context_views(model, ctx))
    for layer in range(CFG.num_layers):
        pos = np.asarray(_layer_cache(packed.cache, layer).pos)[0]  # [K, S]
        for head in pos:
            assert sorted(head[head >= 0].tolist()) == [0, 1, 2, 3, *range(T - 71, T)]


def test_slots_reckoned_at_a_nominal_length_keep_and_answer_the_same(setup):
    """size_length only adds empty slots: a quarter of 1200 tokens (300 slots plus room)
    takes 512 slots where a quarter of the 300-token context takes 256; the same slots are
    kept, first, and the answers agree."""
    model, _, question, ctx = setup
    policies = [make_policy(p, CFG.num_layers, T, 0.25) for p in ("window", "h2o")]
    views = context_views(model, ctx)
    own = compress(model, ctx, policies, 8, views)
    nominal = compress(model, ctx, policies, 8, views, size_length=1200)
    for layer in range(CFG.num_layers):
        a = np.asarray(_layer_cache(own.cache, layer).pos)
        b = np.asarray(_layer_cache(nominal.cache, layer).pos)
        assert a.shape[-1] == 256 and b.shape[-1] == 512
        np.testing.assert_array_equal(b[..., :256], a)
        assert (b[..., 256:] == -1).all()
    np.testing.assert_array_equal(nominal.kept_RL, own.kept_RL)
    want = answer(model, own, T, question, 8, stop_tokens=()).tokens
    assert answer(model, nominal, T, question, 8, stop_tokens=()).tokens == want


def test_observation_mass_is_the_last_queries_attention(setup):
    model, _, _, ctx = setup
    view = context_view(model, ctx, 1)
    q = np.asarray(ctx.q_obs_LBHWD[1, 0], np.float64)[:, :OBS]  # [H, W, D]
    k = np.asarray(view.cache.k[0], np.float64)  # [K, S, D]
    pos = np.asarray(view.cache.pos[0])
    g = CFG.num_heads // CFG.num_kv_heads
    want = np.zeros((CFG.num_kv_heads, OBS, k.shape[1]))
    for h in range(CFG.num_heads):
        kv = h // g
        logit = CFG.scale * q[h] @ k[kv].T
        ok = (pos[kv][None] >= 0) & (pos[kv][None] <= np.arange(T - OBS, T)[:, None])
        logit = np.where(ok, logit, -np.inf)
        p = np.exp(logit - logit.max(1, keepdims=True))
        want[kv] += p / p.sum(1, keepdims=True)
    np.testing.assert_allclose(np.asarray(view.obs_mass_BKWS[0]), want, atol=1e-5)


@pytest.mark.parametrize("kind", ["h2o", "tova", "snapkv", "adakv", "keydiff", "expected", "knorm"])
def test_every_row_keeps_its_budget(setup, kind):
    model, _, question, ctx = setup
    policy = make_policy(kind, CFG.num_layers, T, 0.25)
    packed = compress(model, ctx, [policy], room=16, views=context_views(model, ctx))
    np.testing.assert_array_equal(packed.kept_RL, CFG.num_kv_heads * 75)
    for layer in range(CFG.num_layers):
        pos = np.asarray(_layer_cache(packed.cache, layer).pos)[0]
        assert {0, 1, 2, 3} <= set(pos[0].tolist()) or kind in ("tova", "adakv")
    out = answer(model, packed, T, question, 4, stop_tokens=()).tokens[0]
    assert len(out) == 4


@pytest.mark.parametrize("kind", ["snapkv", "adakv", "pyramidkv"])
def test_budgets_ranked_together_keep_what_each_keeps_alone(setup, kind):
    """One policy at several budgets shares one ranking of the slots (`select` groups rows
    that differ only in capacity), between other policies: every row keeps exactly what it
    keeps when selected on its own, in the order the rows were given."""
    model, _, _, ctx = setup
    views = context_views(model, ctx)
    policies = [make_policy(kind, CFG.num_layers, T, m) for m in (0.5, 0.1, 0.25)]
    policies.insert(1, make_policy("window", CFG.num_layers, T, 0.25))
    together = select(model, ctx, policies, views)
    for r, policy in enumerate(policies):
        alone = select(model, ctx, [policy], views)
        assert together.slots_R[r] == alone.slots_R[0]
        for layer, keeps in together.keeps.items():
            np.testing.assert_array_equal(keeps[r], alone.keeps[layer][0])
    kept = [int(np.sum(together.keeps[0][r])) for r in range(len(policies))]
    assert kept[0] > kept[3] > kept[2]  # 50% > 25% > 10% of the context


def test_oracle_keeps_the_keys_the_sample_will_use(setup):
    """The oracle ranks the context by the sample's true lifespans: positions given a long
    life are kept (with the sinks and the recent window), the budget holds, and it refuses to
    run without the lifespans."""
    model, _, question, ctx = setup
    oracle = make_policy("oracle", CFG.num_layers, T, 0.25)
    life_LKT = np.zeros((CFG.num_layers, CFG.num_kv_heads, T + len(question)), np.float32)
    planted = [40, 41, 97, 150, 151, 152, 203]
    life_LKT[:, 0, planted] = 6.0  # head 0 of every layer: keys the question will read
    packed = compress(model, ctx, [oracle], 16, context_views(model, ctx), life_LKT)
    np.testing.assert_array_equal(packed.kept_RL, CFG.num_kv_heads * 75)
    for layer in range(CFG.num_layers):
        pos = np.asarray(_layer_cache(packed.cache, layer).pos)[0]  # [K, S]
        assert set(planted) <= set(pos[0].tolist()) and {0, 1, 2, 3} <= set(pos[0].tolist())
        assert not set(planted) <= set(pos[1].tolist())  # head 1's lifespans are all zero
    with pytest.raises(ValueError, match="oracle_LKT"):
        compress(model, ctx, [oracle], 16, context_views(model, ctx))


def test_a_head_that_takes_more_than_its_share_keeps_it_all_and_the_room(setup):
    """Heads sharing the budget (Ada-KV's rule) on the oracle's lifespans: head 0 says every
    key lives long, so it takes all T of its slots, more than the 256 a head's share (80% of
    T, plus room) is packed into; the layer grows to hold them and the room, and the others
    share the rest."""
    model, _, question, ctx = setup
    oracle = parse_policy("oracle:adaptive", CFG.num_layers, T, 0.8)
    life_LKT = np.zeros((CFG.num_layers, CFG.num_kv_heads, T + len(question)), np.float32)
    life_LKT[:, 0] = 6.0
    packed = compress(model, ctx, [oracle], 16, context_views(model, ctx), life_LKT)
    share = int(0.8 * T)
    np.testing.assert_array_equal(packed.kept_RL, CFG.num_kv_heads * share)
    for layer in range(CFG.num_layers):
        pos = np.asarray(_layer_cache(packed.cache, layer).pos)[0]  # [K, S]
        assert pos.shape[-1] == 512  # T + room, in steps of 256
        assert sorted(pos[0][pos[0] >= 0].tolist()) == list(range(T))
        assert (pos[1:] >= 0).sum() == CFG.num_kv_heads * share - T
    out = answer(model, packed, T, question, 4, stop_tokens=()).tokens[0]
    assert len(out) == 4


def test_every_compressed_layer_takes_the_largest_slot_count(setup):
    """Layer 0's head 0 takes all T keys, so layer 0 needs 512 slots: every layer gets as
    many (one cache group), each keeps what its policy ranks best, and the empty slots
    change no answer (the same compression with 256 more slots of room answers alike)."""
    model, _, question, ctx = setup
    oracle = parse_policy("oracle:adaptive", CFG.num_layers, T, 0.8)
    life_LKT = np.zeros((CFG.num_layers, CFG.num_kv_heads, T + len(question)), np.float32)
    life_LKT[0, 0] = 6.0
    views = context_views(model, ctx)
    one = compress(model, ctx, [oracle], 8, views, life_LKT)
    roomy = compress(model, ctx, [oracle], 8 + 256, views, life_LKT)
    assert [g.pos.shape[-1] for g in one.cache.groups] == [512]
    assert [g.pos.shape[-1] for g in roomy.cache.groups] == [768]
    np.testing.assert_array_equal(one.kept_RL, CFG.num_kv_heads * int(0.8 * T))
    np.testing.assert_array_equal(roomy.kept_RL, one.kept_RL)
    for layer in range(CFG.num_layers):
        a = np.asarray(_layer_cache(one.cache, layer).pos)
        b = np.asarray(_layer_cache(roomy.cache, layer).pos)
        np.testing.assert_array_equal(b[..., :512], a)
        assert (b[..., 512:] == -1).all()
    want = answer(model, one, T, question, 6, stop_tokens=()).tokens
    assert answer(model, roomy, T, question, 6, stop_tokens=()).tokens == want


def test_rows_packed_apart_keep_and_answer_as_packed_together(setup):
    """A batch of some of a selection's rows: each row holds the same slots as in the batch
    of all, in fewer slots when its need is smaller (window 10%: 256 slots; h2o at 90%: 512),
    and answers alike."""
    model, _, question, ctx = setup
    policies = [
        make_policy("window", CFG.num_layers, T, 0.1),
        make_policy("h2o", CFG.num_layers, T, 0.9),
    ]
    chosen = select(model, ctx, policies, context_views(model, ctx))
    np.testing.assert_array_equal(chosen.sizes(8), [256, 512])
    both = pack(model, ctx, chosen, [0, 1], 8)
    alone = pack(model, ctx, chosen, [0], 8)
    assert [g.pos.shape[-1] for g in alone.cache.groups] == [256]
    np.testing.assert_array_equal(alone.kept_RL, both.kept_RL[:1])
    for layer in range(CFG.num_layers):
        a = np.asarray(_layer_cache(alone.cache, layer).pos)[0]
        b = np.asarray(_layer_cache(both.cache, layer).pos)[0]
        np.testing.assert_array_equal(b[..., :256], a)
        assert (b[..., 256:] == -1).all()
    want = answer(model, both, T, question, 6, stop_tokens=()).tokens[0]
    assert answer(model, alone, T, question, 6, stop_tokens=()).tokens[0] == want


def _step_cost(batches, sizes, batch_cost):
    return sum(batch_cost + len(b) * max(sizes[r] for r in b) for b in batches)


def test_decode_batches_split_where_a_batch_pays():
    sizes = [768, 768, 2816, 1280, 768, 1280, 4352]
    assert decode_batches(sizes, 0) == [[0, 1, 4], [3, 5], [2], [6]]  # batches are free
    assert decode_batches(sizes, 10**6) == [list(range(7))]  # one batch beats any padding
    # padding the three 768s to 1280 costs 3 x 512 slots, as does the 2816 to 4352: apart
    # when a batch costs less (1500), together when it costs more (1600)
    assert decode_batches(sizes, 1500) == [[0, 1, 4], [3, 5], [2], [6]]
    assert decode_batches(sizes, 1600) == [[0, 1, 3, 4, 5], [2, 6]]
    order = sorted(range(7), key=lambda r: sizes[r])
    for cost in (0, 700, 1500, 3000, 6000):
        got = decode_batches(sizes, cost)
        assert sorted(r for b in got for r in b) == list(range(7))
        splits = [  # every split of the rows in size order
            [order[a:b] for a, b in itertools.pairwise((0, *cuts, 7))]
            for n in range(7)
            for cuts in itertools.combinations(range(1, 7), n)
        ]
        best = min(_step_cost(b, sizes, cost) for b in splits)
        assert _step_cost(got, sizes, cost) == best

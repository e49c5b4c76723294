"""Policy names: every form (kinds, gated-only, hybrid, hybrid-calibrated from tables and label
stores, .json tables, :mask / :adaptive / :expiry / :discount=X suffixes in any order) and
clear errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from smartkv_jax.policy import POLICY_KINDS, GatedPolicy, WindowPolicy
from smartkv_jax.policy_table import PolicyConfig
from train.policy_names import (
    ADAPTIVE,
    ADAPTIVE_ALPHA,
    CALIBRATED,
    EXPIRY,
    MASK,
    base_name,
    is_label_store,
    parse_policy,
    split_name,
)


def test_split_name_takes_suffixes_in_any_order():
    assert split_name("oracle") == ("oracle", frozenset())
    assert split_name("oracle:mask:expiry") == ("oracle", {MASK, EXPIRY})
    assert split_name("oracle:expiry:mask") == ("oracle", {MASK, EXPIRY})
    assert base_name(CALIBRATED + EXPIRY) == CALIBRATED
    assert base_name("t.json" + MASK) == "t.json"
    assert split_name("hybrid:discount=1.5:mask") == ("hybrid", {MASK, ":discount=1.5"})


def test_discount_sets_the_age_discount_of_lifespan_layers_only():
    plain = parse_policy("hybrid", 30, 1024, 0.25)
    swept = parse_policy("hybrid:discount=1.5", 30, 1024, 0.25)
    assert swept.name == "hybrid:discount=1.5"
    assert (swept.layers[0], swept.layers[-1]) == (plain.layers[0], plain.layers[-1])
    assert swept.layers[15] == dataclasses.replace(plain.layers[15], discount=1.5)
    assert {p.discount for p in parse_policy("oracle:mask:discount=0", 3, 1024).layers} == {0.0}


@pytest.mark.parametrize(
    "name, message",
    [
        ("oracle:discount=-1", "needs a number X >= 0, got '-1'"),
        ("oracle:discount=abc", "needs a number X >= 0, got 'abc'"),
        ("oracle:discount=nan", "needs a number X >= 0"),
        ("oracle:discount=", "needs a number X >= 0, got ''"),
        ("oracle:expiry:discount=1", "use one of :discount=1, :expiry, not both"),
        ("oracle:discount=1:discount=2", "not both"),
    ],
)
def test_bad_discounts_are_refused(name, message):
    with pytest.raises(ValueError, match=message):
        parse_policy(name, 3, 1024, 0.25)


@pytest.mark.parametrize("kind", POLICY_KINDS)
def test_every_kind_on_every_layer(kind):
    pol = parse_policy(kind, 3, 1024, 0.25)
    assert pol.name == kind and {p.kind for p in pol.layers} == {kind}
    assert pol.layers[0].capacity == (None if kind == "full" else 256)


def test_gated_only_hybrid_and_default_memory():
    gated = parse_policy("gated-only", 3, 1024, 0.25)
    assert gated.name == "gated-only" and all(isinstance(p, GatedPolicy) for p in gated.layers)
    assert parse_policy("window", 3, 1024).layers[0].capacity == 1024  # memory None: 1.0
    hybrid = parse_policy("hybrid", 30, 1024, 0.25)
    assert hybrid.name == "hybrid"
    assert [hybrid.layers[i].kind for i in (0, 15, 29)] == ["window", "gated", "recent"]
    with pytest.raises(ValueError, match="too small"):
        parse_policy("hybrid", 30, 1024, 0.01)


def test_mask_and_expiry_change_only_lifespan_layers():
    masked = parse_policy("oracle:mask", 30, 1024, 0.25)
    assert masked.name == "oracle:mask" and masked.layers[0].capacity == 256
    assert all(p.mask_expired for p in masked.layers)
    assert not any(p.mask_expired for p in parse_policy("oracle", 30, 1024, 0.25).layers)
    hybrid = parse_policy("hybrid" + MASK, 30, 1024, 0.25)
    plain = parse_policy("hybrid", 30, 1024, 0.25)
    assert (hybrid.layers[0], hybrid.layers[-1]) == (plain.layers[0], plain.layers[-1])
    assert hybrid.layers[15] == dataclasses.replace(plain.layers[15], mask_expired=True)
    both = parse_policy("oracle:expiry:mask", 3, 1024, 0.25)
    assert both.layers == parse_policy("oracle:mask:expiry", 3, 1024, 0.25).layers
    assert {(p.discount, p.mask_expired) for p in both.layers} == {(None, True)}


def test_adaptive_shares_heads_in_lifespan_layers_only():
    hybrid = parse_policy("hybrid" + ADAPTIVE + MASK, 30, 1024, 0.25)
    plain = parse_policy("hybrid", 30, 1024, 0.25)
    assert split_name(hybrid.name) == ("hybrid", {ADAPTIVE, MASK})
    assert (hybrid.layers[0], hybrid.layers[-1]) == (plain.layers[0], plain.layers[-1])
    want = dataclasses.replace(plain.layers[15], adaptive=ADAPTIVE_ALPHA, mask_expired=True)
    assert hybrid.layers[15] == want
    assert {p.adaptive for p in plain.layers if isinstance(p, GatedPolicy)} == {None}
    assert "heads share (alpha 0.2)" in hybrid.layers[15].describe()
    with pytest.raises(ValueError, match="invalid policy settings"):
        dataclasses.replace(plain.layers[15], adaptive=1.5)


def test_json_tables(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(PolicyConfig.uniform(3, WindowPolicy(capacity=30)).to_json())
    pol = parse_policy(str(path), 3, 240, 0.5)
    assert pol.name == str(path) and [p.capacity for p in pol.layers] == [30, 30, 30]
    assert parse_policy(str(path) + MASK, 3, 240).layers == pol.layers  # no lifespan layers
    with pytest.raises(FileNotFoundError):
        parse_policy(str(tmp_path / "missing.json"), 3, 240)


def test_calibrated_tables_by_budget(tmp_path):
    for mf, cap in ((0.25, 30), (0.5, 60)):
        table = PolicyConfig.uniform(3, WindowPolicy(capacity=cap))
        (tmp_path / f"calib_{mf:g}.json").write_text(table.to_json())
    pattern = str(tmp_path / "calib_{mf}.json")
    pol = parse_policy(CALIBRATED, 3, 240, 0.5, pattern)
    assert pol.name == CALIBRATED and pol.layers[0].capacity == 60
    assert parse_policy(CALIBRATED, 3, 240, 0.25, pattern).layers[0].capacity == 30
    fixed = parse_policy(CALIBRATED, 3, 240, None, str(tmp_path / "calib_0.25.json"))
    assert fixed.layers[0].capacity == 30  # a table without {mf}: its own memory
    with pytest.raises(FileNotFoundError):
        parse_policy(CALIBRATED, 3, 240, 0.125, pattern)
    with pytest.raises(ValueError, match="needs a label store or a policy table"):
        parse_policy(CALIBRATED, 3, 240, 0.5, None)


def test_calibrated_from_a_label_store(tmp_path, monkeypatch):
    """A label store: the table is derived at each context and budget."""
    import train.calibrate as cal

    stats = {"q95": np.full(3, 500.0), "long_share": np.full(3, 0.3), "live": np.ones(3)}
    monkeypatch.setattr(cal, "layer_statistics", lambda path, tau: stats)
    (tmp_path / "metadata.json").write_text("{}")
    assert is_label_store(str(tmp_path)) and not is_label_store(str(tmp_path / "x.json"))
    for context, mf in ((1024, 0.25), (2048, 0.125)):
        pol = parse_policy(CALIBRATED, 3, context, mf, str(tmp_path))
        assert pol.name == CALIBRATED and {p.kind for p in pol.layers} == {"gated"}
        assert pol.memory_fraction(context) == pytest.approx(mf, abs=0.01)
        assert {p.discount for p in pol.layers} == {0.5}
        exp = parse_policy(CALIBRATED + EXPIRY, 3, context, mf, str(tmp_path))
        assert {p.discount for p in exp.layers} == {None}
        assert [p.capacity for p in exp.layers] == [p.capacity for p in pol.layers]
        both = parse_policy(CALIBRATED + EXPIRY + MASK, 3, context, mf, str(tmp_path))
        assert {(p.discount, p.mask_expired) for p in both.layers} == {(None, True)}


@pytest.mark.parametrize("name", ["windw", "hybrid:bogus", "", ":mask", "gated-only-x"])
def test_unknown_names_are_refused(name):
    with pytest.raises(ValueError, match=r"unknown policy .*hybrid-calibrated.*:mask, :adaptive"):
        parse_policy(name, 3, 1024, 0.25)

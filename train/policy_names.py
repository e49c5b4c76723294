"""Policy names -> per-layer policy tables: the one parser behind `smartkv eval`, `smartkv
generate --policy` and `eval/bench_decode.py`.

A name is a base name with optional suffixes, in any order:

    full window recent h2o tova snapkv knorm random oracle gated   every layer of that kind
    adakv keydiff expected                                          (newer baselines, likewise)
    pyramidkv                                                      SnapKV, pyramid budgets
    gated-only                                                     every layer gated
    hybrid                                                         the seed's per-layer rule
    hybrid-calibrated                                              calibrated from labels (below)
    PATH.json                                                      a policy table file
    :mask    hide expired slots from attention in gated and oracle layers
    :adaptive  in a oneshot compression, gated and oracle layers share each layer's budget
             among its KV heads by rank (Ada-KV's rule, each head at least ADAPTIVE_ALPHA of
             its share) instead of giving every head the same number of slots
    :expiry  rank gated and oracle slots by predicted expiry instead of age-discounted life
    :discount=X  rank them by predicted log4 life - X * log4(1 + age) (X >= 0; the
             calibrated default is train.calibrate.DISCOUNT), for sweeping the discount

"hybrid-calibrated" needs `calibrated`: a label store (`smartkv labels` output; the table is
derived for each context and budget by `train.calibrate.calibrate`) or a JSON table, in whose
path "{mf}" is replaced by the memory fraction (calib_{mf}.json -> calib_0.125.json). It lives
in train/ because calibration reads label stores. See docs/design.md (policies).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from smartkv_jax.errors import SmartKVError
from smartkv_jax.policy import POLICY_KINDS, LifespanPolicy
from smartkv_jax.policy_table import PolicyConfig, check_budget, make_policy

CALIBRATED = "hybrid-calibrated"
MASK = ":mask"
ADAPTIVE = ":adaptive"
ADAPTIVE_ALPHA = 0.2  # Ada-KV's default floor: a head keeps at least 20% of its share
EXPIRY = ":expiry"
DISCOUNT_SUFFIX = ":discount="  # followed by a number
FLAGS = (MASK, ADAPTIVE, EXPIRY)  # suffixes without a value
# what policy_table.make_policy reads
LIBRARY_NAMES = ("gated-only", "hybrid", "pyramidkv", *POLICY_KINDS)


def split_name(name: str) -> tuple[str, frozenset[str]]:
    """(base name, its trailing MASK / ADAPTIVE / EXPIRY / DISCOUNT_SUFFIX suffixes, in any
    order)."""
    found: set[str] = set()
    while True:
        head, sep, tail = name.rpartition(":")
        suffix = sep + tail
        if not (sep and (suffix in FLAGS or suffix.startswith(DISCOUNT_SUFFIX))):
            return name, frozenset(found)
        found.add(suffix)
        name = head


def _discount(name: str, suffixes: frozenset[str]) -> dict[str, float | None]:
    """The ranking change the suffixes ask for: {"discount": X} for DISCOUNT_SUFFIX, {"discount":
    None} for EXPIRY, {} for neither. Raises SmartKVError for a bad or doubled request."""
    asked = sorted(s for s in suffixes if s.startswith(DISCOUNT_SUFFIX) or s == EXPIRY)
    if len(asked) > 1:
        raise SmartKVError(f"policy {name!r}: use one of {', '.join(asked)}, not both")
    if not asked:
        return {}
    if asked[0] == EXPIRY:
        return {"discount": None}
    text = asked[0].removeprefix(DISCOUNT_SUFFIX)
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also NaN
        raise SmartKVError(
            f"policy {name!r}: {DISCOUNT_SUFFIX}X needs a number X >= 0, got {text!r}"
        )
    return {"discount": value}


def base_name(name: str) -> str:
    """A policy name without its suffixes."""
    return split_name(name)[0]


def is_label_store(path: str) -> bool:
    """True when `path` is a label store (`smartkv labels` output) rather than a table."""
    return (Path(path) / "metadata.json").is_file()


def parse_policy(
    name: str,
    num_layers: int,
    context: int,
    memory_fraction: float | None = None,
    calibrated: str | None = None,
) -> PolicyConfig:
    """The policy `name` (see the module docstring) at `context` tokens, named `name`.

    memory_fraction: of the full cache at `context` (None: 1.0, or a calibrated table's own).
    Raises ValueError (SmartKVError) for an unknown name, for hybrid-calibrated without
    `calibrated`, for a memory fraction outside (0, 1] or a context < 1, and when the budget is
    too small for the policy (e.g. the hybrid rule); FileNotFoundError for a missing table.
    """
    check_policy_name(name, calibrated)
    check_budget(context, memory_fraction)
    base, suffixes = split_name(name)
    if base == CALIBRATED:
        policy = _calibrated(calibrated, num_layers, context, memory_fraction)
    else:
        mf = 1.0 if memory_fraction is None else memory_fraction
        policy = make_policy(base, num_layers, context, mf)
    changes = _discount(name, suffixes)
    if MASK in suffixes:
        changes["mask_expired"] = True
    if ADAPTIVE in suffixes:
        changes["adaptive"] = ADAPTIVE_ALPHA
    layers = tuple(
        dataclasses.replace(p, **changes) if isinstance(p, LifespanPolicy) else p
        for p in policy.layers
    )
    return dataclasses.replace(policy, layers=layers, name=name)


def check_policy_name(name: str, calibrated: str | None = None) -> None:
    """The checks of `parse_policy` that need no model: raises SmartKVError for an unknown
    name, a bad or doubled discount suffix and hybrid-calibrated without `calibrated`,
    FileNotFoundError for a missing table file."""
    base, suffixes = split_name(name)
    _discount(name, suffixes)
    if base == CALIBRATED:
        if calibrated is None:
            raise SmartKVError(
                f"{CALIBRATED} needs a label store or a policy table (--calibrated PATH)"
            )
    elif base.endswith(".json"):
        if not Path(base).is_file():
            raise FileNotFoundError(f"policy file not found: {base}")
    elif base not in LIBRARY_NAMES:
        raise SmartKVError(
            f"unknown policy {name!r}; use {', '.join(LIBRARY_NAMES)}, {CALIBRATED} or a .json "
            f"policy table, optionally with the suffixes {', '.join(FLAGS)} or "
            f"{DISCOUNT_SUFFIX}X"
        )


def _calibrated(
    calibrated: str, num_layers: int, context: int, memory_fraction: float | None
) -> PolicyConfig:
    """The hybrid-calibrated table from a label store or a (per-budget) JSON table."""
    if is_label_store(calibrated):
        from .calibrate import calibrate  # imports the gate trainer: only when asked

        return calibrate(calibrated, context, memory_fraction)
    path = calibrated
    if memory_fraction:
        path = path.replace("{mf}", f"{memory_fraction:g}")
    return PolicyConfig.from_file(path, num_layers)

"""Gate checkpoints on disk: the orbax format, its metadata and its checks (docs/design.md:
gate). `load_gates` is all that generation and evaluation need; the trainer (train/) also
saves, resumes and prunes through this module.

A checkpoint directory holds one orbax step directory per saved step, each with two items:

    state     {"params": `Gates.to_state()` payload, leaves [L, K, ...] (device-independent),
               "opt": {"0": leaf, "1": ...} the optimiser state's leaves in tree order,
               "step": int32}
    metadata  JSON: format CKPT_FORMAT, model, tau, gate_config, store_shape [L, K, D],
              train_config, label_store, data (the identity of the training data: label
              store paths, their metadata's sha256, rows, taus, window, cap), history,
              checksum, step, saved_unix_time

A checkpoint of another model, tau, gate config, store shape or training data raises
`CheckpointMismatchError`, an unreadable or damaged one `CheckpointCorruptError` (NaN or
infinite weights: `CheckpointNonFiniteError`); neither touches the files on disk. Pruning
(`prune`) deletes only older steps of the same run's identity.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from .errors import SmartKVError
from .gates import GateConfig, Gates
from .jsonio import describe_differences, jsonable

CKPT_FORMAT = "smartkv-gates/1"
_KEPT = "Nothing was deleted; move that step directory away to use an older one."


class CheckpointError(SmartKVError):
    """A gate checkpoint cannot be used; the files on disk are left as they are."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint belongs to another model, tau, gate config, store shape or training
    data."""


class CheckpointCorruptError(CheckpointError):
    """The checkpoint's files cannot be read or fail their checksum."""


class CheckpointNonFiniteError(CheckpointCorruptError):
    """The checkpoint's gate parameters hold NaN or infinite values."""


def open_manager(ckpt_dir: str | Path, keep: int = 0, read_only: bool = False):
    """Orbax CheckpointManager over `ckpt_dir` with the "state" and "metadata" items, keeping
    the `keep` latest steps (0: all; the trainer keeps all and calls `prune`). A writable one
    removes the temporary directories of saves that were killed midway."""
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep or None,
        create=not read_only,
        read_only=read_only,
        enable_async_checkpointing=False,
        cleanup_tmp_directories=not read_only,
    )
    handlers = {"state": ocp.StandardCheckpointHandler(), "metadata": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(Path(ckpt_dir).absolute(), options=options, item_handlers=handlers)


def checksum(params_state: dict) -> list[float]:
    """[sum, sum |x|] in float64 over all leaves of a `Gates.to_state()` payload (host
    arrays)."""
    leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(params_state)]
    return [float(sum(x.sum() for x in leaves)), float(sum(np.abs(x).sum() for x in leaves))]


def verify_checksum(params_state: dict, meta: dict, step: int, where: str, ok: bool = True):
    """Raise CheckpointCorruptError unless the payload matches the metadata's checksum (and
    the caller's own check `ok` holds)."""
    if not ok or checksum(params_state) != meta.get("checksum"):
        raise CheckpointCorruptError(
            f"checkpoint step {step} in {where} fails its checksum (its weights are damaged). "
            + _KEPT
        )


def read_metadata(manager, step: int, where: str) -> dict:
    """The JSON metadata of `step`; CheckpointCorruptError if unreadable or not ours."""
    import orbax.checkpoint as ocp

    try:
        meta = manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))[
            "metadata"
        ]
    except Exception as err:  # noqa: BLE001 - any failure to read means a bad checkpoint
        raise CheckpointCorruptError(
            f"cannot read the metadata of checkpoint step {step} in {where}: "
            f"{type(err).__name__}: {err}. " + _KEPT
        ) from err
    if not isinstance(meta, dict) or meta.get("format") != CKPT_FORMAT:
        raise CheckpointCorruptError(
            f"checkpoint step {step} in {where} has no {CKPT_FORMAT} metadata "
            f"(got {type(meta).__name__}); it is not a gate checkpoint or it is damaged. "
            "Nothing was deleted."
        )
    return meta


def check_finite(params_state: dict, step: int, where: str) -> None:
    """CheckpointNonFiniteError naming the leaves of a `Gates.to_state()` payload (host
    arrays) that hold NaN or infinite values."""
    bad = [
        jax.tree_util.keystr(path)
        for path, x in jax.tree_util.tree_leaves_with_path(params_state)
        if not np.isfinite(np.asarray(x)).all()
    ]
    if bad:
        raise CheckpointNonFiniteError(
            f"checkpoint step {step} in {where} holds NaN or infinite gate parameters (in "
            + ", ".join(bad[:4])
            + "): the training that wrote it diverged. Load an older step or retrain. "
            + _KEPT
        )


def setup_problems(saved: dict, expected: dict) -> list[str]:
    """Why a checkpoint with metadata `saved` belongs to another run than the one `expected`
    describes (model, tau, store shape, gate config, training data); [] if it does not."""
    problems = []
    if saved.get("model") != expected["model"]:
        problems.append(f"model {saved.get('model')!r} != {expected['model']!r}")
    tau = saved.get("tau")
    if not isinstance(tau, (int, float)) or abs(tau - expected["tau"]) > 1e-9:
        problems.append(f"tau {tau} != {expected['tau']}")
    if saved.get("store_shape") != expected["store_shape"]:
        problems.append(
            f"(layers, kv heads, head dim) {saved.get('store_shape')} != {expected['store_shape']}"
        )
    gate = describe_differences(saved.get("gate_config", {}), expected["gate_config"], "!=", 99)
    if gate:
        problems.append("gate config differs in " + gate)
    return problems + _data_problems(saved, expected.get("data"))


def _data_problems(saved: dict, want: dict | None) -> list[str]:
    """How the training data recorded in `saved` differs from `want` (a checkpoint written
    before the data's identity was recorded: by the training store paths alone)."""
    if want is None:
        return []
    have = saved.get("data")
    if have is None:
        old = (saved.get("label_store") or {}).get("train")
        have = {"train": [old] if isinstance(old, str) else old}
        want = {"train": want["train"]}
        if have["train"] is None:
            return []
    diff = describe_differences(have, want, "!=")
    return [f"training label stores differ ({diff})"] if diff else []


def check_compatible(saved: dict, expected: dict, step: int, where: str) -> None:
    """CheckpointMismatchError if `saved` metadata is for another model, tau, store shape,
    gate config or training data than `expected`; a warning (process 0) if only the train
    config changed."""
    problems = setup_problems(saved, expected)
    if problems:
        raise CheckpointMismatchError(
            f"checkpoint step {step} in {where} was trained for a different setup: "
            + "; ".join(problems)
            + ". Use another --ckpt-dir; the existing checkpoints were left untouched."
        )
    st = {k: v for k, v in saved.get("train_config", {}).items() if k != "steps"}
    et = {k: v for k, v in expected["train_config"].items() if k != "steps"}
    changed = describe_differences({k: st.get(k) for k in et}, et, "->", 99)
    if changed and jax.process_index() == 0:
        warnings.warn(
            f"resuming {where} step {step} with changed train config: {changed}", stacklevel=3
        )


def belongs(manager, step: int, expected: dict, where: str) -> bool:
    """Whether checkpoint `step` is readable and of the run `expected` describes."""
    try:
        return not setup_problems(read_metadata(manager, step, where), expected)
    except CheckpointError:
        return False


def prune(manager, keep: int, is_ours: Callable[[int], bool]) -> list[int]:
    """Delete all but the `keep` latest steps for which `is_ours(step)` (0: keep all). Steps
    of another run (another setup or training data, or unreadable) are never deleted.
    Returns the deleted steps."""
    if keep <= 0:
        return []
    ours = [s for s in sorted(manager.all_steps()) if is_ours(s)]
    for s in ours[:-keep]:
        manager.delete(s)
    return ours[:-keep]


def _check_layout(saved_tree, abstract, step: int, where: str) -> None:
    """CheckpointMismatchError if the saved state's leaves differ in shape from `abstract`
    (e.g. an optimiser state written by another version of the trainer)."""
    saved = {jax.tree_util.keystr(p): tuple(m.shape) for p, m in _leaves_with_path(saved_tree)}
    want = {jax.tree_util.keystr(p): tuple(a.shape) for p, a in _leaves_with_path(abstract)}
    diff = sorted(k for k in set(saved) | set(want) if saved.get(k) != want.get(k))
    if diff:
        raise CheckpointMismatchError(
            f"checkpoint step {step} in {where} holds a state of another layout ("
            + ", ".join(f"{k}: {saved.get(k)} != {want.get(k)}" for k in diff[:4])
            + "); it cannot be resumed, though `load_gates` still reads its weights. Use "
            "another --ckpt-dir; the existing checkpoints were left untouched."
        )


def _leaves_with_path(tree):
    return jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))


def restore_state(manager, step: int, abstract: Any, where: str) -> Any:
    """The "state" item of `step` restored into `abstract` (a tree of jax.ShapeDtypeStruct
    with shardings); CheckpointMismatchError for another layout, CheckpointCorruptError if
    it cannot be read."""
    _check_layout(_saved_tree(manager, step, where), abstract, step, where)
    return _restore(manager, step, abstract, where)


def _saved_tree(manager, step: int, where: str) -> Any:
    """The saved "state" item's tree of array metadata (shape, dtype)."""
    try:
        return manager.item_metadata(step)["state"]
    except Exception as err:  # noqa: BLE001 - any failure to read means a bad checkpoint
        raise _unreadable(step, where, err) from err


def _restore(manager, step: int, abstract: Any, where: str) -> Any:
    import orbax.checkpoint as ocp

    try:
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        return manager.restore(step, args=args)["state"]
    except Exception as err:  # noqa: BLE001
        raise _unreadable(step, where, err) from err


def _unreadable(step: int, where: str, err: Exception) -> CheckpointCorruptError:
    return CheckpointCorruptError(
        f"cannot restore checkpoint step {step} in {where}: {type(err).__name__}: {err}. " + _KEPT
    )


def save_state(manager, step: int, state: Any, meta: dict) -> None:
    """Save `state` (the layout in the module docstring) and its JSON metadata as `step`
    (non-finite floats in the metadata as null)."""
    import orbax.checkpoint as ocp

    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), metadata=ocp.args.JsonSave(jsonable(meta))
        ),
    )
    manager.wait_until_finished()


def load_gates(ckpt_dir: str | Path, step: int | None = None) -> tuple[Gates, dict]:
    """(gates with host leaves [L, K, ...], metadata) from a training checkpoint directory
    (default: its latest step). Raises FileNotFoundError for a missing directory or step,
    CheckpointError for a damaged checkpoint or one with NaN or infinite weights."""
    where = str(ckpt_dir)
    if not Path(ckpt_dir).is_dir():
        raise FileNotFoundError(f"no gate checkpoint directory at {where}")
    absl_log = logging.getLogger("absl")
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)  # orbax warns that a read-only manager will not save
    try:
        manager = open_manager(ckpt_dir, 0, read_only=True)
    finally:
        absl_log.setLevel(level)
    try:
        step = _pick_step(manager, step, where)
        meta = read_metadata(manager, step, where)
        dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev),
            _saved_tree(manager, step, where),
        )
        params = jax.tree.map(np.asarray, _restore(manager, step, abstract, where)["params"])
        check_finite(params, step, where)
        verify_checksum(params, meta, step, where)
        return Gates.from_state(GateConfig.from_dict(meta["gate_config"]), params), meta
    finally:
        manager.close()


def _pick_step(manager, step: int | None, where: str) -> int:
    """`step`, or the latest one; FileNotFoundError if there is none or not that one."""
    steps = sorted(manager.all_steps())
    if not steps:
        raise FileNotFoundError(f"no gate checkpoints in {where}")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise FileNotFoundError(f"no checkpoint step {step} in {where} (it has steps {steps})")
    return step

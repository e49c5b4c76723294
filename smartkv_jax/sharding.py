"""Device mesh and NamedSharding helpers (docs/design.md: sharding and scale).

The mesh has two axes: "data" (batch rows are split over it) and "model" (heads are split
over it). Gate parameters are sharded over "model" along their *flattened* head axis
G = L * K (`gates.flatten_heads`): SmolLM2's 90 heads split evenly over model sizes
1, 2, 3, 5, 6, 9, 10, ...; for other sizes the head axis is padded up to a multiple of the
model size (`padded_heads`), and the padding heads are inert (zero loss weight, dropped on
save). `make_mesh(num_heads=...)` instead picks a model size that divides the heads.

Devices are laid out process-major (sorted by process index, then id), so on a multi-host
run each process owns a contiguous block of the "data" axis as long as its local device
count is a multiple of the model size: every process then feeds a contiguous block of batch
rows (`process_row_range`) through `jax.make_array_from_process_local_data`.

Inference (`shard_model`, `init_cache(..., mesh=)`, `put_batch`) runs on a mesh of this
process's own devices (`inference_mesh`): tensor parallel over "model" (query heads, KV heads,
MLP units), batch rows over "data". An axis that does not split evenly (in whole heads, rows or
units) is replicated instead (`fitted_sharding`). Every consumer reads the mesh off the model's
weights (`model_mesh`), so a model placed once takes its caches and inputs with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

if TYPE_CHECKING:
    from .model import Transformer

AXES = ("data", "model")

# Logical array axis -> mesh axis. None: replicated along that array axis. The model's and
# the gates' nnx.Params name their axes with these (their `out_sharding` metadata).
LOGICAL_RULES: dict[str, str | None] = {
    "batch": "data",
    "heads": "model",  # flattened (layer, KV head) axis of the gates
    "q_heads": "model",  # query heads x head dim of the attention weights
    "kv_heads": "model",
    "mlp": "model",  # MLP hidden units
    "layers": None,
    "vocab": None,
    "embed": None,
    "seq": None,
    "head_dim": None,
    "features": None,
    "hidden": None,
}
# Weight axes that flatten heads x head_dim: they split only in whole heads.
HEAD_AXES = ("q_heads", "kv_heads")
# Axes of the KV cache leaves (smartkv_jax/cache.py): k, v [L, B, K, S, D]; pos, score [L, B, K, S].
CACHE_AXES = ("layers", "batch", "kv_heads", "seq", "head_dim")


def _sorted_devices(devices: Sequence[jax.Device] | None) -> list[jax.Device]:
    devs = list(jax.devices() if devices is None else devices)
    return sorted(devs, key=lambda d: (d.process_index, d.id))


def make_mesh(
    data: int | None = None,
    model: int | None = None,
    *,
    num_heads: int | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A ("data", "model") mesh over `devices` (default: all of `jax.devices()`).

    Give either axis size, both, or neither. With neither, model is 1 unless `num_heads` is
    given, in which case model is the largest size that divides both `num_heads` and the
    per-process device count (so heads split evenly and the model axis stays inside a host);
    data takes the remaining devices.
    """
    devs = _sorted_devices(devices)
    n = len(devs)
    if data is None and model is None:
        model = 1
        if num_heads is not None:
            local = max(1, n // max(1, jax.process_count()))
            model = max(d for d in range(1, local + 1) if local % d == 0 and num_heads % d == 0)
    if model is None:
        if n % data:
            raise ValueError(f"data={data} does not divide the {n} devices")
        model = n // data
    if data is None:
        if n % model:
            raise ValueError(f"model={model} does not divide the {n} devices")
        data = n // model
    if data < 1 or model < 1 or data * model != n:
        raise ValueError(f"mesh data={data} x model={model} does not match the {n} devices")
    return Mesh(np.array(devs, dtype=object).reshape(data, model), AXES)


def mesh_shape(mesh: Mesh) -> tuple[int, int]:
    """(data, model) sizes of the mesh."""
    return int(mesh.shape["data"]), int(mesh.shape["model"])


def padded_heads(num_heads: int, mesh: Mesh) -> int:
    """Smallest multiple of the model-axis size that is >= num_heads."""
    m = mesh_shape(mesh)[1]
    return -(-num_heads // m) * m


def logical_sharding(mesh: Mesh, logical_axes: Sequence[str | None]) -> NamedSharding:
    """NamedSharding for an array whose axes have these logical names (see LOGICAL_RULES)."""
    spec = []
    for name in logical_axes:
        if name is not None and name not in LOGICAL_RULES:
            raise KeyError(f"unknown logical axis {name!r}; known: {sorted(LOGICAL_RULES)}")
        spec.append(None if name is None else LOGICAL_RULES[name])
    return NamedSharding(mesh, P(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    """Fully replicated sharding."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Rows (axis 0) over "data", other axes replicated: for [N, ...] arrays."""
    return NamedSharding(mesh, P("data", *([None] * (ndim - 1))))


def batch_heads_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Rows over "data" and the flat head axis (axis 1) over "model": for [N, G, ...] arrays."""
    return NamedSharding(mesh, P("data", "model", *([None] * (ndim - 2))))


def heads_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Flat head axis (axis 0) over "model": for gate leaves [G, ...]; scalars replicated."""
    if ndim == 0:
        return replicated(mesh)
    return NamedSharding(mesh, P("model", *([None] * (ndim - 1))))


def gate_shardings(tree, mesh: Mesh):
    """Pytree of shardings for a tree of flat-head leaves [G, ...] (scalars replicated)."""
    return jax.tree.map(lambda a: heads_sharding(mesh, np.ndim(a)), tree)


def put_global(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global jax.Array from a host array that every process holds in full (multi-host safe)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def shard_tree(tree, shardings):
    """`put_global` over a pytree of host arrays and a matching pytree of shardings."""
    return jax.tree.map(lambda a, s: put_global(np.asarray(a), s), tree, shardings)


def process_index_range(sharding: NamedSharding, global_shape: Sequence[int], axis: int):
    """[start, stop) of `axis` of a global array that this process's devices hold.

    Raises if this process's part is not one contiguous block along that axis.
    """
    idx_map = sharding.addressable_devices_indices_map(tuple(global_shape))
    spans = set()
    for idx in idx_map.values():
        sl = idx[axis]
        start, stop, _ = sl.indices(global_shape[axis])
        spans.add((start, stop))
    spans = sorted(spans)
    lo, hi = spans[0][0], spans[0][1]
    for s, e in spans[1:]:
        if s > hi:
            raise ValueError(
                f"this process's devices hold a non-contiguous part of axis {axis}: {spans}"
            )
        hi = max(hi, e)
    return lo, hi


def process_row_range(mesh: Mesh, global_rows: int) -> tuple[int, int]:
    """[start, stop) of the rows of a global batch of `global_rows` split over "data" that this
    process feeds."""
    return process_index_range(batch_sharding(mesh, 1), (global_rows,), 0)


def make_global(local: np.ndarray, sharding: NamedSharding, global_shape: Sequence[int]):
    """Global jax.Array from this process's contiguous part of it
    (`jax.make_array_from_process_local_data`)."""
    return jax.make_array_from_process_local_data(sharding, np.asarray(local), tuple(global_shape))


# ----------------------------------------------------------------------------- inference


def inference_mesh(data: int | None = None, model: int | None = None) -> Mesh | None:
    """A mesh over this process's devices (each process runs its own copy of the model):
    data x model as given, or by default every local device on "data"; None with one device
    and no sizes given (the model stays where it is)."""
    devs = jax.local_devices()
    if data is None and model is None and len(devs) == 1:
        return None
    return make_mesh(data, model, devices=devs)


def fitted_sharding(
    mesh: Mesh, logical_axes: Sequence[str | None], units: Sequence[int]
) -> NamedSharding:
    """`logical_sharding`, except that an axis whose `units` (its size in what must stay
    whole: rows, heads, hidden units) its mesh axis does not divide is replicated."""
    spec = logical_sharding(mesh, logical_axes).spec
    fitted = [a if a is None or n % mesh.shape[a] == 0 else None for a, n in zip(spec, units)]
    return NamedSharding(mesh, P(*fitted))


def param_sharding(
    mesh: Mesh, logical_axes: Sequence[str], shape: Sequence[int], head_dim: int
) -> NamedSharding:
    """A model weight's sharding from its logical axes (model.py LAYER_AXES / TOP_AXES); a
    q_heads / kv_heads axis [heads * head_dim] counts in heads."""
    units = [n // head_dim if a in HEAD_AXES else n for a, n in zip(logical_axes, shape)]
    return fitted_sharding(mesh, logical_axes, units)


def cache_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
    """A KV cache leaf [L, B, K, S(, D)]: B over "data", K over "model" where they divide."""
    return fitted_sharding(mesh, CACHE_AXES[: len(shape)], shape)


def shard_model(model: Transformer, mesh: Mesh) -> None:
    """Move every weight of `model` onto `mesh`, in place (`param_sharding`)."""
    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            value = var[...]
            where = param_sharding(mesh, var.out_sharding, value.shape, model.cfg.head_dim)
            var.set_value(jax.device_put(value, where))


def model_mesh(model: nnx.Module) -> Mesh | None:
    """The mesh `model`'s weights lie on (`shard_model`); None on a single device."""
    where = jax.tree.leaves(nnx.state(model, nnx.Param))[0].sharding
    return where.mesh if isinstance(where, NamedSharding) else None


def place_cache(cache, mesh: Mesh | None):
    """A cache pytree (leaves [L, B, K, S(, D)]) moved to `cache_sharding` (as is without a
    mesh)."""
    if mesh is None:
        return cache
    return jax.tree.map(lambda x: jax.device_put(x, cache_sharding(mesh, x.shape)), cache)


def put_batch(x, mesh: Mesh | None) -> jax.Array:
    """A batch input [B, ...] (tokens, positions) as a jax.Array: rows over "data" where they
    divide, else replicated; on the default device without a mesh."""
    if mesh is None:
        return jnp.asarray(x)
    return jax.device_put(x, fitted_sharding(mesh, ("batch",), np.shape(x)[:1]))


def put_replicated(x, mesh: Mesh | None) -> jax.Array:
    """`x` as a jax.Array on every device of the mesh (a loop's step count, a PRNG key); on
    the default device without a mesh."""
    return jnp.asarray(x) if mesh is None else jax.device_put(x, replicated(mesh))


def on_each_shard(kernel, mesh: Mesh, batch: int, kv_heads: int):
    """`kernel(q_BHCD, k_BKSD, v_BKSD, slot_pos_BKS, pos_BC) -> (out_BHCD, lse_BHC)` run by
    every device on its own rows and heads (jax.shard_map), as a Pallas kernel must be: XLA
    cannot split a custom call itself. Rows split over "data" and KV heads (with their query
    heads) over "model" where they divide, as `put_batch` and `cache_sharding` place them."""
    rows = fitted_sharding(mesh, ("batch",), (batch,)).spec[0]
    heads = fitted_sharding(mesh, ("kv_heads",), (kv_heads,)).spec[0]
    q, kv, slots = P(rows, heads, None, None), P(rows, heads, None, None), P(rows, heads, None)
    return jax.shard_map(
        kernel,
        mesh=mesh,
        in_specs=(q, kv, kv, slots, P(rows, None)),
        out_specs=(q, P(rows, heads, None)),
        check_vma=False,
    )

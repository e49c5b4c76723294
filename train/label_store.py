"""Label stores: the on-disk format of lifespan labels, its writer and its reader
(docs/design.md: lifespan, label, censoring).

A store is a directory holding a `datasets` Arrow dataset in data/, one row per (window,
position) with the key of every layer and KV head, and metadata.json, written last (a store
without it is incomplete). Columns, for a model with L layers, K KV heads of dim D, labelled
at n_taus thresholds:

    key        float32 [L, K, D]      pre-RoPE key
    lifespan   int32 [n_taus, L, K]   lifespan at each tau, clipped at the cap
    censored   bool                   the lifespan is only a lower bound
    pos        int32                  position within the window
    doc, window                       source file name and window index (no window twice)

metadata.json holds at least `REQUIRED_METADATA` (train/labels.py adds how it was made).
`StoreWriter` writes a store, `open_store` reads one (or joins several) as memory-mapped
numpy arrays.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

REQUIRED_METADATA = ("model", "taus", "cap", "num_layers", "num_kv_heads", "head_dim")
REQUIRED_COLUMNS = ("key", "lifespan", "censored", "pos")
# metadata that stores must share to be joined into one
_JOIN_FIELDS = ("model", "taus", "cap", "window", "num_layers", "num_kv_heads", "head_dim")


def check_metadata(meta: dict[str, Any], where: str | Path) -> None:
    """Raise ValueError unless `meta` holds every field of `REQUIRED_METADATA`."""
    for field in REQUIRED_METADATA:
        if field not in meta:
            raise ValueError(f"label store {where}: metadata.json has no {field!r}")


def label_of(lifespan: np.ndarray) -> np.ndarray:
    """y = log4(1 + L) as float32."""
    return (np.log1p(np.asarray(lifespan, np.float64)) / np.log(4.0)).astype(np.float32)


# ----------------------------------------------------------------------------- writing


class StoreWriter:
    """Collects labelled windows in Arrow form and writes them as one label store."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, n_taus: int):
        import datasets

        lk = (num_layers, num_kv_heads)
        self.features = datasets.Features(
            {
                "key": datasets.Array3D((*lk, head_dim), "float32"),
                "lifespan": datasets.Array3D((n_taus, *lk), "int32"),
                "censored": datasets.Value("bool"),
                "pos": datasets.Value("int32"),
                "doc": datasets.Value("string"),
                "window": datasets.Value("int32"),
            }
        )
        self._parts: list = []

    def add_window(self, labels: dict[str, np.ndarray], doc: str, window: int) -> None:
        """One window's rows: labels["key"] [T, L, K, D], ["lifespan"] [T, n_taus, L, K],
        ["censored"] [T], ["pos"] [T] (as `train.labels.window_labels` returns them)."""
        import datasets

        t = len(labels["pos"])
        rows = {name: labels[name] for name in REQUIRED_COLUMNS}
        rows.update(doc=[doc] * t, window=np.full(t, window, np.int32))
        self._parts.append(datasets.Dataset.from_dict(rows, features=self.features))

    def write(self, out_dir: str | Path, meta: dict[str, Any]) -> dict[str, Any]:
        """Write data/ and then metadata.json (so a complete store is one with metadata);
        returns `meta`."""
        import datasets

        out = Path(out_dir)
        check_metadata(meta, out)
        if not self._parts:
            raise ValueError(f"label store {out}: no windows to write")
        out.mkdir(parents=True, exist_ok=True)
        datasets.concatenate_datasets(self._parts).save_to_disk(str(out / "data"))
        (out / "metadata.json").write_text(json.dumps(meta, indent=2))  # written last: complete
        return meta


# ----------------------------------------------------------------------------- reading


@dataclasses.dataclass
class LabelStore:
    """A label store opened for reading. Arrays view the Arrow files (memory-mapped) when
    possible, so opening a large store costs no memory until rows are read. A store joined
    from several (`open_store([a, b])`) holds their rows in order, in memory."""

    paths: tuple[Path, ...]
    meta: dict[str, Any]
    keys_NLKD: np.ndarray  # float32 [N, L, K, D] pre-RoPE keys
    lifespan_NTLK: np.ndarray  # int32 [N, n_taus, L, K] lifespans clipped at cap
    censored_N: np.ndarray  # bool [N]: lifespan only a lower bound
    pos_N: np.ndarray  # int32 [N] position within the window

    @property
    def name(self) -> str:
        return " + ".join(str(p) for p in self.paths)

    def path_record(self) -> str | list[str]:
        """Absolute path(s) for checkpoint metadata: a string for one store, else a list."""
        full = [str(p.absolute()) for p in self.paths]
        return full[0] if len(full) == 1 else full

    @property
    def num_rows(self) -> int:
        return int(self.pos_N.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        """(L, K, D)."""
        return tuple(int(x) for x in self.keys_NLKD.shape[1:])  # type: ignore[return-value]

    @property
    def cap(self) -> int:
        return int(self.meta["cap"])

    def tau_index(self, tau: float) -> int:
        """Index of `tau` in the store's taus; raises ValueError naming the available ones."""
        taus = [float(t) for t in self.meta["taus"]]
        for i, t in enumerate(taus):
            if abs(t - tau) < 1e-9:
                return i
        raise ValueError(f"tau {tau} is not in label store {self.name} (it has taus {taus})")

    def labels(self, tau: float, rows: np.ndarray | None = None) -> np.ndarray:
        """y_nLK = log4(1 + lifespan) (float32) at `tau` for `rows` (default: all)."""
        ti = self.tau_index(tau)
        life = self.lifespan_NTLK[:, ti] if rows is None else self.lifespan_NTLK[rows, ti]
        return label_of(life)


def _arrow_column(ds, name: str, inner_shape: tuple[int, ...], dtype) -> np.ndarray:
    """Column `name` of a datasets.Dataset as a numpy array [N, *inner_shape], zero-copy from
    the Arrow buffers where the layout allows it."""
    import pyarrow as pa

    n = len(ds)
    if getattr(ds, "_indices", None) is None:
        parts = []
        for chunk in ds.data.table.column(name).chunks:
            arr = chunk.storage if isinstance(chunk, pa.ExtensionArray) else chunk
            while (
                pa.types.is_list(arr.type)
                or pa.types.is_large_list(arr.type)
                or (pa.types.is_fixed_size_list(arr.type))
            ):
                arr = arr.flatten()
            parts.append(arr.to_numpy(zero_copy_only=False))
        flat = parts[0] if len(parts) == 1 else np.concatenate(parts)
    else:  # a selected/shuffled view: let datasets materialise it
        flat = np.asarray(ds.with_format("numpy")[name]).reshape(-1)
    want = n * int(np.prod(inner_shape, dtype=np.int64))
    if flat.size != want:
        raise ValueError(
            f"column {name!r} holds {flat.size} values, expected {n} rows x {inner_shape}"
        )
    return flat.astype(dtype, copy=False).reshape(n, *inner_shape)


def open_store(
    path: str | Path | LabelStore | Sequence[str | Path],
    in_memory: bool | None = None,
    max_memory_gb: float = 4.0,
) -> LabelStore:
    """Open a label store directory (metadata.json + data/). A LabelStore passes through; a
    list of directories is joined into one store (same model, taus, cap, window and shapes;
    no window labelled twice).

    in_memory: copy the arrays into RAM (faster random batches than reading the memory-mapped
    Arrow files); None: only when the keys take at most `max_memory_gb` GiB.
    """
    if isinstance(path, LabelStore):
        return path
    if not isinstance(path, (str, Path)):
        paths = list(path)
        if len(paths) == 1:
            return open_store(paths[0], in_memory, max_memory_gb)
        return _join_stores([open_store(p, in_memory=False) for p in paths])
    store = _read_store(Path(path))
    if in_memory is None:
        in_memory = store.keys_NLKD.nbytes <= max_memory_gb * 2**30
    if in_memory:
        store.keys_NLKD = np.array(store.keys_NLKD)
        store.lifespan_NTLK = np.array(store.lifespan_NTLK)
    return store


def _read_store(path: Path) -> LabelStore:
    """One store directory, its arrays viewing the Arrow files; checks the format."""
    import datasets

    meta_file = path / "metadata.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path} is not a label store (no metadata.json)")
    meta = json.loads(meta_file.read_text())
    check_metadata(meta, path)
    ds = datasets.load_from_disk(str(path / "data"))
    missing = set(REQUIRED_COLUMNS) - set(ds.column_names)
    if missing:
        raise ValueError(f"label store {path}: data/ lacks columns {sorted(missing)}")
    nl, nk, d = int(meta["num_layers"]), int(meta["num_kv_heads"]), int(meta["head_dim"])
    return LabelStore(
        paths=(path,),
        meta=meta,
        keys_NLKD=_arrow_column(ds, "key", (nl, nk, d), np.float32),
        lifespan_NTLK=_arrow_column(ds, "lifespan", (len(meta["taus"]), nl, nk), np.int32),
        censored_N=_arrow_column(ds, "censored", (), bool),
        pos_N=_arrow_column(ds, "pos", (), np.int32),
    )


def _labelled_windows(store: LabelStore) -> set[tuple[str, int]]:
    """(doc, window) pairs of a single store, read from its doc/window columns."""
    import datasets

    ds = datasets.load_from_disk(str(store.paths[0] / "data")).select_columns(["doc", "window"])
    table = ds.data.table
    pairs = zip(table.column("doc").to_pylist(), table.column("window").to_pylist())
    return set(pairs)


def _join_stores(stores: list[LabelStore]) -> LabelStore:
    first = stores[0]
    seen: dict[tuple[str, int], str] = {}
    for s in stores:
        for field in _JOIN_FIELDS:
            if s.meta.get(field) != first.meta.get(field):
                raise ValueError(
                    f"cannot join label stores {first.name} and {s.name}: {field} differs "
                    f"({first.meta.get(field)!r} vs {s.meta.get(field)!r})"
                )
        for doc, w in sorted(_labelled_windows(s)):
            if (doc, w) in seen:
                raise ValueError(
                    f"cannot join label stores: window {w} of {doc} is in both {seen[doc, w]} "
                    f"and {s.name}"
                )
            seen[doc, w] = s.name
    meta = dict(first.meta)
    meta["sources"] = sorted({d for s in stores for d in s.meta.get("sources", [])})
    meta["n_windows"] = sum(int(s.meta.get("n_windows", 0)) for s in stores)
    return LabelStore(
        paths=tuple(p for s in stores for p in s.paths),
        meta=meta,
        keys_NLKD=np.concatenate([s.keys_NLKD for s in stores]),
        lifespan_NTLK=np.concatenate([s.lifespan_NTLK for s in stores]),
        censored_N=np.concatenate([s.censored_N for s in stores]),
        pos_N=np.concatenate([s.pos_N for s in stores]),
    )


def eval_rows(store: LabelStore, max_rows: int = 0) -> np.ndarray:
    """Uncensored rows of a store (evenly thinned to at most max_rows; 0: all)."""
    rows = np.flatnonzero(~store.censored_N)
    if len(rows) == 0:
        raise ValueError(f"label store {store.name} has no uncensored keys to evaluate on")
    if max_rows and len(rows) > max_rows:
        rows = rows[np.linspace(0, len(rows) - 1, max_rows).astype(int)]
    return rows

"""Label stores: the on-disk format of lifespan labels, its writers and its reader
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

Writing never destroys a store: `write_store` (and `StoreWriter.write`) builds the new store
in `<out>.partial/assembled/`, next to the target, then moves it into place (the old store
goes to `<out>.partial/old/` for the moment between the two renames and is then deleted), so
an interruption leaves the old store or the new one, never a mix; the next write finishes a
move that was cut between its renames (`finish_install`). A directory that holds anything
but a label store is never replaced. `train.label_shards.PartialStore` keeps the windows of a
`smartkv labels` run as one shard each in `<out>.partial/windows/`, so a killed run resumes
where it stopped and ends with the same store.

`open_store` reads one store (or joins several) as memory-mapped numpy arrays and checks it:
metadata.json (present, JSON, the keys and kinds it needs), the Arrow data (present,
readable, as many rows as the metadata says), finite keys and lifespans within [0, cap].
Every error names the store and what is wrong (`InputFileError`; FileNotFoundError when
there is no store at all).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from smartkv_jax.errors import InputFileError, SmartKVError
from smartkv_jax.input_files import is_positive_int, read_json_file, require_keys, require_object
from smartkv_jax.jsonio import write_json

REQUIRED_METADATA = ("model", "taus", "cap", "num_layers", "num_kv_heads", "head_dim")
REQUIRED_COLUMNS = ("key", "lifespan", "censored", "pos")
METADATA = "metadata.json"
# metadata that stores must share to be joined into one
# stores of different window lengths join (each row keeps its own censoring), the rest must match
_JOIN_FIELDS = ("model", "taus", "cap", "num_layers", "num_kv_heads", "head_dim")
_SIZES = ("cap", "num_layers", "num_kv_heads", "head_dim")


def check_metadata(meta: Any, where: str | Path) -> dict[str, Any]:
    """`meta` if it is a label store's metadata: an object with every field of
    `REQUIRED_METADATA`, positive integer sizes and taus a non-empty list of thresholds in
    (0, 1). Raises InputFileError naming the store, the field and the required ones."""
    what = f"label store {where}: {METADATA}"
    require_object(meta, what, REQUIRED_METADATA)
    require_keys(meta, what, REQUIRED_METADATA)
    for key in _SIZES:
        if not is_positive_int(meta[key]):
            raise InputFileError(f"{what}: {key} must be a positive integer, got {meta[key]!r}")
    taus = meta["taus"]
    if not (isinstance(taus, list) and taus and all(_is_tau(t) for t in taus)):
        raise InputFileError(
            f"{what}: taus must be a non-empty list of thresholds in (0, 1), got {taus!r}"
        )
    return meta


def _is_tau(t: Any) -> bool:
    return isinstance(t, (int, float)) and not isinstance(t, bool) and 0 < t < 1


def label_of(lifespan: np.ndarray) -> np.ndarray:
    """y = log4(1 + L) as float32."""
    return (np.log1p(np.asarray(lifespan, np.float64)) / np.log(4.0)).astype(np.float32)


def partial_dir(out: str | Path) -> Path:
    """`<out>.partial`: where a store is built and an unfinished labelling run keeps its work."""
    out = Path(os.path.abspath(out))
    return out.with_name(out.name + ".partial")


@contextlib.contextmanager
def quiet_datasets():
    """No `datasets` progress bars inside the block (one per window would drown the output)."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def remove_path(path: Path) -> None:
    """Delete a file or directory tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


# ----------------------------------------------------------------------------- writing


def store_features(num_layers: int, num_kv_heads: int, head_dim: int, n_taus: int):
    """The `datasets.Features` of a store's rows."""
    import datasets

    lk = (num_layers, num_kv_heads)
    return datasets.Features(
        {
            "key": datasets.Array3D((*lk, head_dim), "float32"),
            "lifespan": datasets.Array3D((n_taus, *lk), "int32"),
            "censored": datasets.Value("bool"),
            "pos": datasets.Value("int32"),
            "doc": datasets.Value("string"),
            "window": datasets.Value("int32"),
        }
    )


def window_rows(labels: dict[str, np.ndarray], doc: str, window: int, features):
    """One window's rows as a `datasets.Dataset`: labels["key"] [T, L, K, D], ["lifespan"]
    [T, n_taus, L, K], ["censored"] [T], ["pos"] [T] (as `train.labels.window_labels`
    returns them)."""
    import datasets

    t = len(labels["pos"])
    rows = {name: labels[name] for name in REQUIRED_COLUMNS}
    rows.update(doc=[doc] * t, window=np.full(t, window, np.int32))
    return datasets.Dataset.from_dict(rows, features=features)


class StoreWriter:
    """Collects labelled windows in memory and writes them as one label store."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, n_taus: int):
        self.features = store_features(num_layers, num_kv_heads, head_dim, n_taus)
        self._parts: list = []

    def add_window(self, labels: dict[str, np.ndarray], doc: str, window: int) -> None:
        """One window's rows (see `window_rows`)."""
        self._parts.append(window_rows(labels, doc, window, self.features))

    def write(self, out_dir: str | Path, meta: dict[str, Any], overwrite: bool = False) -> dict:
        """`write_store(rows, out_dir, meta, overwrite=overwrite)`; returns `meta`."""
        return write_store(self._parts, out_dir, meta, overwrite=overwrite)


def write_store(parts: Sequence, out_dir: str | Path, meta: dict, overwrite: bool = False) -> dict:
    """Write the rows of `parts` (datasets.Dataset, in order) and `meta` as the label store
    `out_dir`: built in `<out_dir>.partial/assembled/` (data/ first, metadata.json last),
    then moved into place. An existing store is replaced only with `overwrite`; a directory
    holding anything else never. Returns `meta`."""
    import datasets

    out = Path(out_dir)
    check_metadata(meta, out)
    if not parts:
        raise SmartKVError(f"label store {out}: no windows to write")
    finish_install(out)
    if holds_store(out) and not overwrite:
        raise SmartKVError(
            f"label store {out} already exists; pass overwrite=True (smartkv labels "
            "--overwrite) to replace it"
        )
    new = partial_dir(out) / "assembled"
    remove_path(new)
    new.mkdir(parents=True)
    with quiet_datasets():
        datasets.concatenate_datasets(list(parts)).save_to_disk(str(new / "data"))
    write_json(new / METADATA, meta, indent=2)  # written last: the store is complete
    _install(out)
    return meta


def holds_store(out: Path) -> bool:
    """False if `out` is absent or an empty directory, True if it holds a label store
    (complete or not); SmartKVError if it is a file or holds anything else, which no writer
    replaces."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise SmartKVError(f"{out} is a file; a label store is a directory: choose another path")
    names = sorted(p.name for p in out.iterdir())
    if names and not {METADATA, "data"} & set(names):
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise SmartKVError(
            f"{out} is not empty and is not a label store (it holds {shown}); it is never "
            "replaced: choose another output directory or empty it"
        )
    return bool(names)


def _install(out: Path) -> None:
    """Move `<out>.partial/assembled` to `out`; the old store, if any, is deleted after, and
    `<out>.partial` too if nothing else is left in it."""
    work = partial_dir(out)
    new, old = work / "assembled", work / "old"
    remove_path(old)
    if out.exists():
        os.replace(out, old)
    os.replace(new, out)  # an interruption before this line: finish_install completes it
    remove_path(old)
    with contextlib.suppress(OSError):  # kept while it holds an unfinished run's windows
        work.rmdir()


def finish_install(out: str | Path) -> None:
    """Complete a move into place (`_install`) that an interruption cut between its renames:
    the complete new store goes to `out`; the old one back if there is no new one."""
    out = Path(out)
    work = partial_dir(out)
    new, old = work / "assembled", work / "old"
    if not out.exists() and (new / METADATA).is_file():
        os.replace(new, out)
    if old.exists():
        if out.exists():
            remove_path(old)
        else:
            os.replace(old, out)


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

    @property
    def layer_windows(self) -> tuple[int, ...]:
        """The labelled model's attention window per layer (ModelConfig.layer_windows)."""
        return tuple(int(w) for w in self.meta.get("model_config", {}).get("layer_windows", ()))

    def tau_index(self, tau: float) -> int:
        """Index of `tau` in the store's taus; raises ValueError naming the available ones."""
        taus = [float(t) for t in self.meta["taus"]]
        for i, t in enumerate(taus):
            if abs(t - tau) < 1e-9:
                return i
        raise SmartKVError(f"tau {tau} is not in label store {self.name} (it has taus {taus})")

    def labels(self, tau: float, rows: np.ndarray | None = None) -> np.ndarray:
        """y_nLK = log4(1 + lifespan) (float32) at `tau` for `rows` (default: all)."""
        ti = self.tau_index(tau)
        life = self.lifespan_NTLK[:, ti] if rows is None else self.lifespan_NTLK[rows, ti]
        return label_of(life)


def _arrow_column(ds, name: str, inner_shape: tuple[int, ...], dtype, where: Path) -> np.ndarray:
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
        raise InputFileError(
            f"label store {where}: column {name!r} holds {flat.size} values, expected {n} rows "
            f"x {inner_shape} (as {METADATA} gives the shapes)"
        )
    return flat.astype(dtype, copy=False).reshape(n, *inner_shape)


def open_store(
    path: str | Path | LabelStore | Sequence[str | Path],
    in_memory: bool | None = None,
    max_memory_gb: float = 4.0,
) -> LabelStore:
    """Open a label store directory (metadata.json + data/), checked (see the module
    docstring). A LabelStore passes through; a list of directories is joined into one store
    (same model, taus, cap, window and shapes; no window labelled twice).

    in_memory: copy the arrays into RAM (faster random batches than reading the memory-mapped
    Arrow files); None: only when the keys take at most `max_memory_gb` GiB.
    """
    if isinstance(path, LabelStore):
        return path
    if not isinstance(path, (str, Path)):
        paths = list(path)
        if not paths:
            raise SmartKVError("no label store given")
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


def read_metadata(path: Path) -> dict[str, Any]:
    """The checked metadata.json of store directory `path`."""
    if path.is_file():
        raise InputFileError(
            f"{path} is a file; a label store is a directory holding {METADATA} and data/"
        )
    if not path.exists():
        raise FileNotFoundError(f"label store {path} does not exist{_unfinished_hint(path)}")
    if not (path / METADATA).is_file():
        raise FileNotFoundError(
            f"{path} is not a label store (no {METADATA}: not a store, or one whose writing "
            f"did not finish){_unfinished_hint(path)}"
        )
    return check_metadata(read_json_file(path / METADATA, "label store metadata"), path)


def _unfinished_hint(path: Path) -> str:
    work = partial_dir(path)
    if not work.exists():
        return ""
    return f"; {work} holds the work of an unfinished `smartkv labels`: rerun it to finish"


def _load_data(path: Path, meta: dict[str, Any]):
    """The data/ dataset of store `path`, with the columns and rows its metadata promises."""
    import datasets

    data = path / "data"
    if not data.is_dir():
        raise InputFileError(f"label store {path}: data/ is missing ({METADATA} is there)")
    try:
        with quiet_datasets():
            ds = datasets.load_from_disk(str(data))
    except Exception as err:  # datasets and pyarrow raise assorted errors on damaged files
        raise InputFileError(
            f"label store {path}: cannot read data/ (truncated or damaged Arrow files; "
            f"relabel the store): {type(err).__name__}: {err}"
        ) from err
    if not isinstance(ds, datasets.Dataset):
        raise InputFileError(f"label store {path}: data/ holds a DatasetDict, not one dataset")
    missing = set(REQUIRED_COLUMNS) - set(ds.column_names)
    if missing:
        raise InputFileError(f"label store {path}: data/ lacks columns {sorted(missing)}")
    windows, window = meta.get("n_windows"), meta.get("window")
    if is_positive_int(windows) and is_positive_int(window) and len(ds) != windows * window:
        raise InputFileError(
            f"label store {path}: data/ holds {len(ds)} rows, {METADATA} promises "
            f"{windows * window} ({windows} windows of {window}): truncated or not its data"
        )
    return ds


def _read_store(path: Path) -> LabelStore:
    """One store directory, its arrays viewing the Arrow files; checks everything."""
    meta = read_metadata(path)
    ds = _load_data(path, meta)
    nl, nk, d = int(meta["num_layers"]), int(meta["num_kv_heads"]), int(meta["head_dim"])
    nt = len(meta["taus"])
    store = LabelStore(
        paths=(path,),
        meta=meta,
        keys_NLKD=_arrow_column(ds, "key", (nl, nk, d), np.float32, path),
        lifespan_NTLK=_arrow_column(ds, "lifespan", (nt, nl, nk), np.int32, path),
        censored_N=_arrow_column(ds, "censored", (), bool, path),
        pos_N=_arrow_column(ds, "pos", (), np.int32, path),
    )
    _check_values(store)
    return store


def _check_values(store: LabelStore, block_bytes: int = 2**26) -> None:
    """InputFileError unless every key is finite and every lifespan in [0, cap]; reads the
    arrays in blocks of about `block_bytes`."""
    keys = store.keys_NLKD.reshape(store.num_rows, -1)
    step = max(1, block_bytes // max(1, keys.shape[1] * 4))
    bad = [
        np.flatnonzero(~np.isfinite(keys[i : i + step]).all(axis=1)) + i
        for i in range(0, len(keys), step)
    ]
    bad_rows = np.concatenate(bad) if bad else np.zeros(0, int)
    if len(bad_rows):
        raise InputFileError(
            f"label store {store.name}: {len(bad_rows)} of {store.num_rows} rows have NaN or "
            f"infinite keys (the first is row {bad_rows[0]}); relabel the store"
        )
    if store.num_rows:
        low, high = int(store.lifespan_NTLK.min()), int(store.lifespan_NTLK.max())
        if low < 0 or high > store.cap:
            raise InputFileError(
                f"label store {store.name}: lifespans must be in [0, cap={store.cap}], found "
                f"{low}..{high}"
            )


def _labelled_windows(store: LabelStore) -> set[tuple[str, int]]:
    """(doc, window) pairs of a single store, read from its doc/window columns."""
    ds = _load_data(store.paths[0], store.meta).select_columns(["doc", "window"])
    table = ds.data.table
    pairs = zip(table.column("doc").to_pylist(), table.column("window").to_pylist())
    return set(pairs)


def _token_spans(store: LabelStore) -> list[tuple[str, int, int]]:
    """(doc, first token, end token) of each window of a single store: window w of length T
    holds the book's tokens [w*T, (w+1)*T)."""
    t = int(store.meta["window"])
    return [(doc, w * t, (w + 1) * t) for doc, w in sorted(_labelled_windows(store))]


def _check_disjoint(stores: list[LabelStore]) -> None:
    """SmartKVError if two windows of different stores hold any of the same tokens."""
    seen: dict[str, list[tuple[int, int, str]]] = {}
    for s in stores:
        for doc, begin, end in _token_spans(s):
            for b, e, name in seen.get(doc, []):
                if begin < e and b < end:
                    raise SmartKVError(
                        f"cannot join label stores: tokens {begin}..{end - 1} of {doc} in "
                        f"{s.name} overlap tokens {b}..{e - 1} in {name}"
                    )
        for doc, begin, end in _token_spans(s):
            seen.setdefault(doc, []).append((begin, end, s.name))


def _join_stores(stores: list[LabelStore]) -> LabelStore:
    first = stores[0]
    for s in stores:
        for field in _JOIN_FIELDS:
            if s.meta.get(field) != first.meta.get(field):
                raise SmartKVError(
                    f"cannot join label stores {first.name} and {s.name}: {field} differs "
                    f"({first.meta.get(field)!r} vs {s.meta.get(field)!r})"
                )
    _check_disjoint(stores)
    meta = dict(first.meta)
    meta["sources"] = sorted({d for s in stores for d in s.meta.get("sources", [])})
    meta["n_windows"] = sum(int(s.meta.get("n_windows", 0)) for s in stores)
    windows = sorted({int(s.meta["window"]) for s in stores})
    meta["window"] = windows[0] if len(windows) == 1 else windows  # tokens per window
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
        raise SmartKVError(f"label store {store.name} has no uncensored keys to evaluate on")
    if max_rows and len(rows) > max_rows:
        rows = rows[np.linspace(0, len(rows) - 1, max_rows).astype(int)]
    return rows

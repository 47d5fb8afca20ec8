"""The feature cache: one HDF5 file per split, written once by `ltcli extract`, read by every
classifier stage (design.md section 5).

Layout::

    /features            N x D (or N x K x D with K views), float16 (default) or float32,
                         chunked by rows, allocated in full when the file is created
    /labels              N int64
    /index               N int64: position of each row in the split's image list
    /classifier/weight   C x D float32 (the stage-1 linear classifier)
    /classifier/bias     C float32
    attrs                format, split, class_names (JSON), train_class_counts, backbone_sha256,
                         data_fingerprint, dataset_id, transform, views, arch, seed, batch_size,
                         rows_done, complete   (+ shard_rank, shard_world, row_start, row_stop
                         on the per-rank shards of a distributed extraction)

Crash safety and bit-identical resume: the file is created complete in shape (every dataset
allocated, labels/index/classifier written, every attribute present with `rows_done=0`,
`complete=False`) under a temporary name and renamed into place. After that the only changes
are in-place writes of feature rows and in-place updates of `rows_done` (after the rows are
flushed) and finally of `complete` (after everything else is flushed). No timestamps are
stored. So a run killed at any point and resumed from `rows_done` ends with exactly the bytes
of an uninterrupted run.
"""

from __future__ import annotations

import errno
import json
import os
import queue
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from .console import err_console
from .errors import LtcliError
from .io import exclusive_lock
from .featureset import FeatureSet

__all__ = [
    "FORMAT_VERSION",
    "FeatureSet",
    "FeatureWriter",
    "read_features",
    "read_attrs",
    "check_compatible",
    "info",
    "info_table",
    "shard_path",
]

FORMAT_VERSION = 1
DTYPES = {"float16": np.float16, "float32": np.float32}
# Attributes that must agree for a file to be resumed or reused ("provenance").
PROVENANCE_KEYS = (
    "format",
    "split",
    "backbone_sha256",
    "data_fingerprint",
    "dataset_id",
    "class_names",
    "train_class_counts",
    "transform",
    "views",
    "arch",
    "seed",
    "shard_rank",
    "shard_world",
    "row_start",
    "row_stop",
)
REQUIRED_ATTRS = (
    "format",
    "split",
    "class_names",
    "train_class_counts",
    "backbone_sha256",
    "data_fingerprint",
    "transform",
    "views",
    "complete",
)
_CHUNK_BYTES = 1 << 20      # target size of one HDF5 chunk of /features
_CACHE_BYTES = 32 << 20     # raw-data chunk cache per open file
_READ_ROWS_BYTES = 64 << 20  # rows read per step when loading /features


# --------------------------------------------------------------------------------------------
# small helpers


def shard_path(out: str | os.PathLike, rank: int, world_size: int) -> Path:
    """Where rank `rank` of `world_size` writes its share of `out`."""
    return Path(f"{out}.rank{rank}-of-{world_size}.h5")


def _short(value: Any) -> str:
    if isinstance(value, str) and len(value) > 16:
        return value[:12] + "…"
    if isinstance(value, (list, tuple, np.ndarray)):
        text = json.dumps(_plain(value))
        return text if len(text) <= 40 else text[:37] + "…"
    return repr(_plain(value))


def _plain(value: Any) -> Any:
    """h5py attribute values -> plain Python (str, int, float, bool, list)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()] if value.ndim else _plain(value.item())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _first_line(exc: BaseException, limit: int = 160) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line[:limit]


def _h5_reason(exc: BaseException) -> str:
    """The useful part of an h5py error: "Unable to open file (file signature not found)"
    -> "file signature not found"."""
    line = _first_line(exc, 400)
    m = re.search(r"\(([^()]*)\)\s*$", line)
    reason = m.group(1) if m else line
    return reason[:120]


def _is_enospc(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    text = str(exc)
    return "No space left" in text or "errno = 28" in text


def _write_error(path: Path, exc: BaseException, rows_done: int, rows: int) -> LtcliError:
    if _is_enospc(exc):
        return LtcliError(
            f"{path}: no space left on device after {rows_done} of {rows} rows; the file is kept "
            "incomplete: free some space and rerun `ltcli extract` to resume"
        )
    if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return LtcliError(f"{path}: not writable ({exc.strerror})")
    return LtcliError(f"{path}: cannot write features ({_first_line(exc)})")


def _import_h5py():
    import h5py

    return h5py


def _open_h5(path: str | os.PathLike, mode: str = "r", **kwargs):
    """Open an existing features file; every failure is a one-line LtcliError."""
    h5py = _import_h5py()
    path = Path(path)
    if not path.exists():
        raise LtcliError(f"{path}: features file not found")
    if path.is_dir():
        raise LtcliError(f"{path}: is a directory, expected a features .h5 file")
    try:
        return h5py.File(path, mode, locking=False if mode == "r" else "best-effort", **kwargs)
    except OSError as exc:
        if isinstance(exc, PermissionError) or exc.errno in (errno.EACCES, errno.EPERM):
            raise LtcliError(f"{path}: not readable ({exc.strerror or _first_line(exc)})") from None
        raise LtcliError(f"{path}: not a valid ltcli features file ({_h5_reason(exc)})") from None


def _attrs_of(f, path: Path) -> dict[str, Any]:
    """The file's attributes as plain values; class_names decoded from JSON."""
    try:
        attrs = {k: _plain(v) for k, v in f.attrs.items()}
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise LtcliError(f"{path}: corrupt features file (attributes unreadable: {_h5_reason(exc)})") from None
    missing = [k for k in REQUIRED_ATTRS if k not in attrs]
    if missing:
        raise LtcliError(
            f"{path}: not an ltcli features file (missing attribute{'s' if len(missing) > 1 else ''} "
            f"{', '.join(missing)})"
        )
    try:
        fmt = int(attrs["format"])
    except (TypeError, ValueError):
        raise LtcliError(f"{path}: not an ltcli features file (bad format attribute)") from None
    if fmt > FORMAT_VERSION:
        raise LtcliError(
            f"{path}: feature cache format {fmt} is newer than this ltcli supports "
            f"({FORMAT_VERSION}); upgrade ltcli"
        )
    names = attrs["class_names"]
    if isinstance(names, str):
        try:
            names = json.loads(names)
        except json.JSONDecodeError:
            raise LtcliError(f"{path}: corrupt features file (class_names is not JSON)") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise LtcliError(f"{path}: corrupt features file (class_names is not a list of names)")
    attrs["class_names"] = names
    counts = attrs["train_class_counts"]
    counts = [counts] if not isinstance(counts, list) else counts
    try:
        attrs["train_class_counts"] = [int(c) for c in counts]
        attrs["views"] = int(attrs["views"])
    except (TypeError, ValueError):
        raise LtcliError(f"{path}: corrupt features file (train_class_counts or views are not integers)") from None
    if len(attrs["train_class_counts"]) != len(names):
        raise LtcliError(
            f"{path}: corrupt features file ({len(names)} class names but "
            f"{len(attrs['train_class_counts'])} train counts)"
        )
    attrs["complete"] = bool(attrs["complete"])
    return attrs


def _datasets_of(f, path: Path, attrs: Mapping[str, Any]):
    for name in ("features", "labels", "index"):
        if name not in f or not hasattr(f[name], "shape"):
            raise LtcliError(f"{path}: not an ltcli features file (missing dataset /{name})")
    feats, labels, index = f["features"], f["labels"], f["index"]
    for name, ds, kinds, what in (("features", feats, "fiu", "numbers"), ("labels", labels, "iu", "integers"),
                                  ("index", index, "iu", "integers")):
        if ds.dtype.kind not in kinds:
            raise LtcliError(f"{path}: corrupt features file (/{name} holds {ds.dtype}, expected {what})")
    n = feats.shape[0] if feats.ndim else -1
    views = attrs["views"]
    want_ndim = 2 if views == 1 else 3
    if feats.ndim != want_ndim or (views > 1 and feats.shape[1] != views):
        raise LtcliError(
            f"{path}: corrupt features file (/features has shape {feats.shape}, "
            f"expected {'N x D' if views == 1 else f'N x {views} x D'})"
        )
    if labels.shape != (n,) or index.shape != (n,):
        raise LtcliError(
            f"{path}: corrupt features file (/features has {n} rows but /labels {labels.shape}, "
            f"/index {index.shape})"
        )
    return feats, labels, index


def read_attrs(path: str | os.PathLike) -> dict[str, Any]:
    """The attributes of a features file (complete or not), validated; adds `path`."""
    path = Path(path)
    with _open_h5(path) as f:
        attrs = _attrs_of(f, path)
    attrs["path"] = str(path)
    return attrs


# --------------------------------------------------------------------------------------------
# reading


def _mmap_rows(f, dset, n: int):
    """A copy-on-write memory map of /features when its chunks lie in order, back to back."""
    try:
        dsid = dset.id
        plist = dsid.get_create_plist()
        if plist.get_nfilters():
            return None
        chunks = dset.chunks
        if chunks is None:
            offset = dsid.get_offset()
            if offset is None:
                return None
            return np.memmap(f.filename, dtype=dset.dtype, mode="c", offset=offset, shape=dset.shape)
        rows = chunks[0]
        if tuple(chunks[1:]) != tuple(dset.shape[1:]):
            return None
        nchunks = dsid.get_num_chunks()
        if nchunks != -(-n // rows):
            return None
        chunk_bytes = int(np.prod(chunks)) * dset.dtype.itemsize
        base = None
        for i in range(nchunks):
            info_i = dsid.get_chunk_info(i)
            if info_i.chunk_offset[0] != i * rows or info_i.size != chunk_bytes:
                return None
            if base is None:
                base = info_i.byte_offset
            elif info_i.byte_offset != base + i * chunk_bytes:
                return None
        if base is None:
            return None
        arr = np.memmap(
            f.filename, dtype=dset.dtype, mode="c", offset=base, shape=(nchunks * rows, *chunks[1:])
        )
        return arr[:n]
    except (AttributeError, OSError, ValueError, RuntimeError):
        return None


def read_features(path: str | os.PathLike, *, mmap: bool = False) -> FeatureSet:
    """Load a complete features file as a FeatureSet (features float32, N x D or N x K x D).

    With mmap=True the features are a copy-on-write memory map of the file in the stored
    dtype (float16 by default) instead, so a large file is paged in as it is used.
    Refuses (LtcliError) missing, non-HDF5, truncated, corrupt, incomplete, shard and
    newer-format files."""
    path = Path(path)
    with _open_h5(path) as f:
        attrs = _attrs_of(f, path)
        if not attrs["complete"]:
            raise LtcliError(
                f"{path}: incomplete feature cache (extraction did not finish; rerun "
                "`ltcli extract` to resume)"
            )
        if "shard_rank" in attrs:
            raise LtcliError(
                f"{path}: is shard {attrs['shard_rank']} of {attrs.get('shard_world')} of a "
                "distributed extraction; read the merged file"
            )
        feats, labels_ds, index_ds = _datasets_of(f, path, attrs)
        n = feats.shape[0]
        try:
            labels = torch.from_numpy(np.asarray(labels_ds[()], dtype=np.int64))
            index = torch.from_numpy(np.asarray(index_ds[()], dtype=np.int64))
            features = None
            if mmap:
                arr = _mmap_rows(f, feats, n)
                if arr is not None:
                    features = torch.from_numpy(arr)
            if features is None:
                out_dtype = np.dtype(feats.dtype) if mmap else np.dtype(np.float32)
                out = np.empty(feats.shape, dtype=out_dtype)
                row_bytes = max(1, int(np.prod(feats.shape[1:])) * 4)
                step = max(1, _READ_ROWS_BYTES // row_bytes)
                for s in range(0, n, step):
                    e = min(n, s + step)
                    out[s:e] = feats[s:e]
                features = torch.from_numpy(out)
            weight = bias = None
            if "classifier" in f:
                g = f["classifier"]
                if "weight" in g:
                    weight = torch.from_numpy(np.asarray(g["weight"][()], dtype=np.float32))
                if "bias" in g:
                    bias = torch.from_numpy(np.asarray(g["bias"][()], dtype=np.float32))
        except OSError as exc:
            raise LtcliError(
                f"{path}: corrupt or truncated features file ({_h5_reason(exc)})"
            ) from None
        dtype = str(np.dtype(feats.dtype))
    c = len(attrs["class_names"])
    if n and (int(labels.min()) < 0 or int(labels.max()) >= c):
        raise LtcliError(f"{path}: corrupt features file (labels outside 0..{c - 1})")
    if weight is not None and (weight.ndim != 2 or weight.shape[0] != c or weight.shape[1] != features.shape[-1]):
        raise LtcliError(
            f"{path}: corrupt features file (/classifier/weight is {tuple(weight.shape)}, "
            f"expected {c} x {features.shape[-1]})"
        )
    prov = {
        k: attrs[k]
        for k in (
            "format", "backbone_sha256", "data_fingerprint", "dataset_id", "transform",
            "views", "arch", "seed",
        )
        if k in attrs
    }
    prov.update(path=str(path), dtype=dtype, index=index)
    return FeatureSet(
        features=features,
        labels=labels,
        weight=weight,
        bias=bias,
        class_names=list(attrs["class_names"]),
        train_counts=torch.tensor(attrs["train_class_counts"], dtype=torch.int64),
        split=str(attrs["split"]),
        attrs=prov,
    )


# --------------------------------------------------------------------------------------------
# compatibility


def _describe(item) -> tuple[str, dict[str, Any], int | None]:
    if isinstance(item, (str, os.PathLike)):
        attrs = read_attrs(item)
        with _open_h5(item) as f:
            dim = f["features"].shape[-1] if "features" in f else None
        return str(item), attrs, dim
    attrs = dict(getattr(item, "attrs", {}) or {})
    attrs.setdefault("class_names", list(item.class_names))
    name = str(attrs.get("path", f"<{getattr(item, 'split', 'features')} features>"))
    return name, attrs, int(item.features.shape[-1])


def check_same_source(name_a: str, attrs_a: Mapping[str, Any], name_b: str, attrs_b: Mapping[str, Any]) -> None:
    """Refuse two things (feature files, heads) made by different backbones or from different
    data: compares backbone_sha256 and dataset_id where both sides record them."""
    for key, what in (("backbone_sha256", "backbones"), ("dataset_id", "datasets")):
        va, vb = attrs_a.get(key), attrs_b.get(key)
        if va is not None and vb is not None and va != vb:
            raise LtcliError(f"{name_a} and {name_b} come from different {what} ({key} {_short(va)} vs {_short(vb)})")


def check_cache_options(dtype: str, views: int, batch_size: int) -> None:
    """The options of a feature cache, checked before any image is decoded."""
    if dtype not in DTYPES:
        raise LtcliError(f"--dtype {dtype}: must be float16 or float32")
    if views < 1:
        raise LtcliError(f"--views {views}: must be at least 1")
    if batch_size < 1:
        raise LtcliError(f"--batch-size {batch_size}: must be at least 1")


def check_compatible(*sets_or_paths) -> None:
    """Refuse feature sets that do not come from the same backbone and the same data.

    Compares backbone_sha256, dataset_id (one id shared by every split of a run's data),
    class_names and the feature dimension; the error names both files and the field."""
    described = [_describe(x) for x in sets_or_paths]
    if len(described) < 2:
        return
    name0, a0, d0 = described[0]
    for name, a, d in described[1:]:
        check_same_source(name0, a0, name, a)
        if list(a0.get("class_names", [])) != list(a.get("class_names", [])):
            raise LtcliError(
                f"{name0} and {name} come from different datasets (class_names "
                f"{len(a0.get('class_names', []))} classes vs {len(a.get('class_names', []))}, or "
                "in another order)"
            )
        if d0 is not None and d is not None and d0 != d:
            raise LtcliError(f"{name0} and {name} have different feature dimensions ({d0} vs {d})")


# --------------------------------------------------------------------------------------------
# writing


def _expected_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(attrs)
    out["format"] = FORMAT_VERSION
    names = out.get("class_names")
    if not isinstance(names, str):
        out["class_names"] = json.dumps(list(names), ensure_ascii=False)
    return out


class FeatureWriter:
    """Create, resume or reuse a features file and stream rows into it from a thread.

    Use as a context manager::

        with FeatureWriter(path, rows=N, dim=D, labels=..., index=..., attrs={...}) as w:
            if not w.reused:
                for start in range(w.rows_done, N, w.batch_size):
                    w.write(start, block)            # numpy / CPU tensor, rows start..start+len
                w.finish()

    On entering, the writer takes `exclusive_lock(path)` (a second writer is refused), then:
    no file -> creates it; a complete file with the same provenance -> `reused` (nothing is
    written, unless overwrite); an incomplete file with the same provenance -> resumes at
    `rows_done` with the batch size it was started with; any other file -> LtcliError naming
    the first differing field (or, with overwrite=True, deletes it and starts afresh).
    Rows must arrive in order, one batch (`batch_size` rows, less for the last) per call, so a
    resumed run repeats the uninterrupted run's batches exactly."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        rows: int,
        dim: int,
        labels: Sequence[int] | np.ndarray,
        index: Sequence[int] | np.ndarray,
        attrs: Mapping[str, Any],
        views: int = 1,
        dtype: str = "float16",
        weight: torch.Tensor | np.ndarray | None = None,
        bias: torch.Tensor | np.ndarray | None = None,
        batch_size: int = 256,
        overwrite: bool = False,
        queue_size: int = 4,
        quiet: bool = False,
        lock: bool = True,
    ) -> None:
        check_cache_options(dtype, views, batch_size)
        self.path = Path(path)
        self.rows = int(rows)
        self.dim = int(dim)
        self.views = int(views)
        self.dtype = dtype
        self.np_dtype = np.dtype(DTYPES[dtype])
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        self.index = np.asarray(index, dtype=np.int64).reshape(-1)
        if len(self.labels) != self.rows or len(self.index) != self.rows:
            raise ValueError("labels and index need one entry per row")
        self.weight = None if weight is None else np.asarray(torch.as_tensor(weight).detach().float().cpu())
        self.bias = None if bias is None else np.asarray(torch.as_tensor(bias).detach().float().cpu())
        self.attrs = _expected_attrs({**attrs, "views": self.views})
        self.batch_size = int(batch_size)
        self.overwrite = overwrite
        self.queue_size = max(1, int(queue_size))
        self.quiet = quiet
        self.use_lock = lock
        self.reused = False
        self.resumed = False
        self.rows_done = 0
        self.shape = (self.rows, self.dim) if self.views == 1 else (self.rows, self.views, self.dim)
        self._lock_cm = None
        self._file = None
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._error: BaseException | None = None
        self._next = 0
        self._written = 0
        self._finished = False
        self._slow = float(os.environ.get("LTCLI_TEST_SLOW_CHUNK", "0") or 0)

    # ---- opening -----------------------------------------------------------------------
    def __enter__(self) -> "FeatureWriter":
        if self.use_lock:
            self._lock_cm = exclusive_lock(self.path)
            self._lock_cm.__enter__()
        try:
            self._open()
        except BaseException:
            self._release()
            raise
        return self

    def _release(self) -> None:
        if self._lock_cm is not None:
            cm, self._lock_cm = self._lock_cm, None
            cm.__exit__(None, None, None)

    def _mismatch(self, f) -> tuple[str, Any, Any] | None:
        """The first provenance field where the existing file differs from this job."""
        have = {k: _plain(v) for k, v in f.attrs.items()}
        want = {k: _plain(v) for k, v in self.attrs.items()}
        for key in PROVENANCE_KEYS:
            if key == "seed" and self.views == 1:
                continue   # the test-time transform does not use the seed
            if key in want or key in have:
                if want.get(key) != have.get(key):
                    return key, have.get(key), want.get(key)
        feats = f.get("features")
        if feats is None or not hasattr(feats, "shape"):
            return "features", None, "present"
        if tuple(feats.shape) != self.shape:
            return "shape", tuple(feats.shape), self.shape
        if np.dtype(feats.dtype) != self.np_dtype:
            return "dtype", str(np.dtype(feats.dtype)), self.dtype
        for name, want_arr in (("labels", self.labels), ("index", self.index)):
            ds = f.get(name)
            if ds is None or ds.shape != want_arr.shape or not np.array_equal(ds[()], want_arr):
                return name, "(different)", "(this data)"
        return None

    def inspect(self) -> str:
        """What entering would do with the existing file, without changing anything:
        "create" (no file), "reuse", "resume" or "replace" (overwrite); LtcliError when a
        different or unreadable file is in the way and overwrite is off."""
        path = self.path
        if not path.exists():
            return "create"
        if path.is_dir():
            raise LtcliError(f"{path}: is a directory, expected a features .h5 file")
        try:
            f = _open_h5(path, "r")
        except LtcliError as exc:
            if not self.overwrite:
                raise LtcliError(f"{exc}; pass --overwrite to replace it") from None
            return "replace"
        try:
            complete = bool(_plain(f.attrs.get("complete", False)))
            diff = self._mismatch(f) if "rows_done" in f.attrs else ("rows_done", None, "present")
            self._found_rows = int(_plain(f.attrs.get("rows_done", 0)))
            self._found_batch = int(_plain(f.attrs.get("batch_size", self.batch_size)))
        except (OSError, KeyError, ValueError, TypeError) as exc:
            diff = ("attributes", f"unreadable ({_first_line(exc, 60)})", "readable")
            complete = False
        finally:
            f.close()
        if self.overwrite:
            return "replace"
        if diff is not None:
            key, old, new = diff
            state = "complete" if complete else "incomplete"
            raise LtcliError(
                f"{path}: an existing {state} features file was made with a different {key} "
                f"({_short(old)} in the file vs {_short(new)} now); pass --overwrite to replace it"
            )
        return "reuse" if complete else "resume"

    def _open(self) -> None:
        path = self.path
        state = self.inspect()
        if state == "reuse":
            self.reused = True
            self.rows_done = self.rows
            if not self.quiet:
                err_console.print(f"reusing {path} (complete, same provenance; --overwrite recomputes)")
            return
        if state == "resume":
            self.resumed = True
            self.batch_size = self._found_batch
            self.rows_done = min(max(0, self._found_rows), self.rows)
            self._open_for_writing()
            if not self.quiet and self.rows_done:
                err_console.print(f"resuming {path} at row {self.rows_done} of {self.rows}")
            return
        if state == "replace":
            try:
                path.unlink()
            except OSError as exc:
                raise _write_error(path, exc, 0, self.rows) from None
        self._create()
        self._open_for_writing()

    def _row_bytes(self) -> int:
        return self.views * self.dim * self.np_dtype.itemsize

    def _check_space(self, rows_left: int) -> None:
        need = rows_left * self._row_bytes()
        try:
            free = shutil.disk_usage(self.path.parent).free
        except OSError:
            return
        if need > free:
            raise LtcliError(
                f"{self.path}: not enough disk space ({need / 1e9:.2f} GB needed for "
                f"{rows_left} rows, {free / 1e9:.2f} GB free)"
            )

    def _create(self) -> None:
        h5py = _import_h5py()
        path = self.path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _write_error(path, exc, 0, self.rows) from None
        self._check_space(self.rows)
        tmp = path.with_name(f".{path.name}.creating")
        try:
            tmp.unlink(missing_ok=True)
            with h5py.File(tmp, "w", locking="best-effort") as f:
                row_elems = self.views * self.dim
                chunk_rows = max(1, min(max(self.rows, 1), _CHUNK_BYTES // max(1, row_elems * self.np_dtype.itemsize)))
                dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
                dcpl.set_chunk((chunk_rows,) + self.shape[1:])
                dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)   # whole layout fixed now
                dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)     # no zero-fill pass
                dcpl.set_obj_track_times(False)                  # no timestamps
                f.create_dataset("features", shape=self.shape, dtype=self.np_dtype, dcpl=dcpl)
                f.create_dataset("labels", data=self.labels, track_times=False)
                f.create_dataset("index", data=self.index, track_times=False)
                if self.weight is not None or self.bias is not None:
                    g = f.create_group("classifier")
                    if self.weight is not None:
                        g.create_dataset("weight", data=self.weight.astype(np.float32), track_times=False)
                    if self.bias is not None:
                        g.create_dataset("bias", data=self.bias.astype(np.float32), track_times=False)
                for key, value in self.attrs.items():
                    if key in ("rows_done", "complete", "batch_size"):
                        continue
                    if key == "train_class_counts":
                        value = np.asarray(value, dtype=np.int64)
                    elif value is None:
                        value = ""
                    f.attrs[key] = value
                f.attrs["batch_size"] = np.int64(self.batch_size)
                f.attrs["rows_done"] = np.int64(0)
                f.attrs["complete"] = np.bool_(False)
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise _write_error(path, exc, 0, self.rows) from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self.rows_done = 0

    def _open_for_writing(self) -> None:
        h5py = _import_h5py()
        if self.rows_done < self.rows:
            self._check_space(self.rows - self.rows_done)
        try:
            self._file = h5py.File(self.path, "r+", locking="best-effort", rdcc_nbytes=_CACHE_BYTES)
            self._dset = self._file["features"]
        except OSError as exc:
            raise LtcliError(
                f"{self.path}: cannot open for writing ({_h5_reason(exc)}); pass --overwrite "
                "to replace it"
            ) from None
        self._next = self.rows_done
        self._written = self.rows_done
        self._queue = queue.Queue(maxsize=self.queue_size)
        self._thread = threading.Thread(target=self._run, name="ltcli-feature-writer", daemon=True)
        self._thread.start()

    # ---- the writer thread -------------------------------------------------------------
    def _run(self) -> None:
        assert self._queue is not None
        while True:
            item = self._queue.get()
            if item is None:
                return
            start, block, event, release = item
            try:
                if self._error is None:
                    if event is not None:
                        event.synchronize()
                    arr = block.numpy() if isinstance(block, torch.Tensor) else np.asarray(block)
                    self._write_rows(start, arr)
            except BaseException as exc:  # noqa: BLE001 - handed to the producer
                self._error = exc
            finally:
                if release is not None:
                    release()

    def _write_rows(self, start: int, arr: np.ndarray) -> None:
        n = arr.shape[0]
        if arr.dtype != self.np_dtype:
            with np.errstate(over="ignore", invalid="ignore"):
                arr = arr.astype(self.np_dtype)
        if not np.isfinite(arr).all():
            bad = int(start + np.flatnonzero(~np.isfinite(arr.reshape(n, -1)).all(axis=1))[0])
            hint = " (values beyond the float16 range: use --dtype float32)" if self.dtype == "float16" else ""
            raise LtcliError(f"{self.path}: row {bad} has non-finite features{hint}")
        try:
            self._dset[start : start + n] = arr
            self._file.flush()
            self._file.attrs.modify("rows_done", np.int64(start + n))
            self._file.flush()
        except OSError as exc:
            raise _write_error(self.path, exc, self._written, self.rows) from None
        self._written = start + n
        if self._slow:
            err_console.file.write(f"ltcli-test: rows_done={self._written}\n")
            err_console.file.flush()
            time.sleep(self._slow)

    # ---- producer side -----------------------------------------------------------------
    def _raise_pending(self) -> None:
        if self._error is not None:
            err = self._error
            if isinstance(err, LtcliError):
                raise err
            raise _write_error(self.path, err, self._written, self.rows)

    def write(
        self,
        start: int,
        block: np.ndarray | torch.Tensor,
        *,
        event: Any = None,
        release: Callable[[], None] | None = None,
    ) -> None:
        """Queue rows start..start+len(block) (in the stored layout, N x D or N x K x D).

        `event` (a torch.cuda.Event) is waited on before `block` is read, so a non-blocking
        device-to-host copy can be handed over without a sync; `release()` is called once the
        block has been written (to recycle a pinned buffer)."""
        if self.reused or self._queue is None:
            raise RuntimeError("FeatureWriter.write on a file that is not open for writing")
        if start != self._next:
            raise RuntimeError(f"rows out of order: got {start}, expected {self._next}")
        n = int(block.shape[0])
        if tuple(block.shape[1:]) != self.shape[1:]:
            raise RuntimeError(f"block of shape {tuple(block.shape)} does not fit {self.shape}")
        if start + n > self.rows:
            raise RuntimeError("more rows than the file holds")
        self._next = start + n
        item = (start, block, event, release)
        while True:
            self._raise_pending()
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                if self._thread is None or not self._thread.is_alive():
                    self._raise_pending()
                    raise RuntimeError("feature writer thread stopped")

    def _drain(self) -> None:
        if self._thread is not None and self._queue is not None:
            while self._thread.is_alive():
                try:
                    self._queue.put(None, timeout=0.1)
                    break
                except queue.Full:
                    continue
            self._thread.join()
        self._thread = None

    def _close_file(self) -> None:
        if self._file is not None:
            f, self._file = self._file, None
            try:
                f.close()
            except Exception:  # noqa: BLE001 - a failed close after an error changes nothing
                pass

    def finish(self) -> Path:
        """Wait for every queued row, then mark the file complete (the last write)."""
        if self.reused:
            return self.path
        self._drain()
        self._raise_pending()
        if self._written != self.rows:
            raise RuntimeError(f"finish() after {self._written} of {self.rows} rows")
        try:
            self._file.flush()
            self._file.attrs.modify("complete", np.bool_(True))
            self._file.flush()
            f, self._file = self._file, None
            f.close()
        except OSError as exc:
            raise _write_error(self.path, exc, self._written, self.rows) from None
        self._finished = True
        return self.path

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._drain()
            self._close_file()
        finally:
            self._release()
        if exc_type is None and not self._finished and not self.reused:
            # left without finish(): the file stays incomplete and resumable
            pass


# --------------------------------------------------------------------------------------------
# info


def info(path: str | os.PathLike, *, many: float = 100, few: float = 20) -> dict[str, Any]:
    """A JSON-ready summary of a features file, complete or not (for `ltcli info`)."""
    path = Path(path)
    with _open_h5(path) as f:
        attrs = _attrs_of(f, path)
        feats, labels_ds, _ = _datasets_of(f, path, attrs)
        try:
            labels = np.asarray(labels_ds[()], dtype=np.int64)
            has_w = "classifier" in f and "weight" in f["classifier"]
            w_shape = list(f["classifier"]["weight"].shape) if has_w else None
        except OSError as exc:
            raise LtcliError(f"{path}: corrupt or truncated features file ({_h5_reason(exc)})") from None
        shape = list(feats.shape)
        dtype = str(np.dtype(feats.dtype))
        chunks = list(feats.chunks) if feats.chunks else None
    names = attrs["class_names"]
    counts = attrs["train_class_counts"]
    c = len(names)
    if len(labels) and (labels.min() < 0 or labels.max() >= c):
        raise LtcliError(f"{path}: corrupt features file (labels outside 0..{c - 1})")
    rows_per_class = np.bincount(labels, minlength=c) if c else np.zeros(0, np.int64)
    from .evaluate import GROUP_NAMES, shot_groups

    groups = shot_groups(np.asarray(counts, dtype=np.int64), many=many, few=few) if c else np.zeros(0, np.int64)
    classes = [
        {
            "name": names[i],
            "train_count": int(counts[i]),
            "group": GROUP_NAMES[int(groups[i])],
            "rows": int(rows_per_class[i]),
        }
        for i in range(c)
    ]
    group_summary = {
        g: {
            "classes": int((groups == k).sum()),
            "rows": int(rows_per_class[groups == k].sum()),
            "train_images": int(np.asarray(counts, dtype=np.int64)[groups == k].sum()) if c else 0,
        }
        for k, g in enumerate(GROUP_NAMES)
    }
    n = shape[0]
    out = {
        "path": str(path),
        "format": int(attrs["format"]),
        "complete": attrs["complete"],
        "rows_done": int(attrs.get("rows_done", n if attrs["complete"] else 0)),
        "rows": n,
        "split": attrs["split"],
        "shape": shape,
        "dtype": dtype,
        "views": attrs["views"],
        "dim": shape[-1],
        "chunks": chunks,
        "num_classes": c,
        "classifier": w_shape,
        "thresholds": {"many": many, "few": few},
        "groups": group_summary,
        "classes": classes,
        "provenance": {
            k: attrs.get(k)
            for k in ("backbone_sha256", "data_fingerprint", "dataset_id", "arch", "transform", "seed", "batch_size")
        },
        "size_bytes": path.stat().st_size,
    }
    if "shard_rank" in attrs:
        out["shard"] = {k: attrs.get(k) for k in ("shard_rank", "shard_world", "row_start", "row_stop")}
    return out


def info_table(d: Mapping[str, Any], max_classes: int = 50):
    """A rich renderable of `info()`'s dict (stderr tables for `ltcli info`)."""
    from rich.console import Group
    from rich.table import Table

    state = (
        "[green]complete[/]"
        if d["complete"]
        else f"[yellow]incomplete[/] ({d['rows_done']} of {d['rows']} rows written; rerun `ltcli extract` to resume)"
    )
    top = Table(title=str(d["path"]), show_header=False, box=None, pad_edge=False)
    top.add_column(style="bold")
    top.add_column()
    top.add_row("state", state)
    top.add_row("split", str(d["split"]))
    top.add_row("features", f"{' x '.join(map(str, d['shape']))} {d['dtype']}" + (f" ({d['views']} views)" if d["views"] > 1 else ""))
    top.add_row("classes", str(d["num_classes"]))
    top.add_row("classifier", " x ".join(map(str, d["classifier"])) if d["classifier"] else "none")
    if "shard" in d:
        s = d["shard"]
        top.add_row("shard", f"rank {s['shard_rank']} of {s['shard_world']}, rows {s['row_start']}..{s['row_stop']}")
    for key, value in d["provenance"].items():
        if value not in (None, ""):
            top.add_row(key, str(value))
    top.add_row("size", f"{d['size_bytes'] / 1e6:.1f} MB")

    groups = Table(title=f"shot groups (train count: many > {d['thresholds']['many']:g}, few < {d['thresholds']['few']:g})")
    groups.add_column("group")
    groups.add_column("classes", justify="right")
    groups.add_column("train images", justify="right")
    groups.add_column("rows here", justify="right")
    for g, v in d["groups"].items():
        groups.add_row(g, str(v["classes"]), str(v["train_images"]), str(v["rows"]))
    parts: list[Any] = [top, groups]
    if d["classes"] and len(d["classes"]) <= max_classes:
        cls = Table(title="classes")
        cls.add_column("#", justify="right")
        cls.add_column("name")
        cls.add_column("train", justify="right")
        cls.add_column("group")
        cls.add_column("rows here", justify="right")
        for i, row in enumerate(d["classes"]):
            cls.add_row(str(i), row["name"], str(row["train_count"]), row["group"], str(row["rows"]))
        parts.append(cls)
    elif d["classes"]:
        parts.append(f"{len(d['classes'])} classes (per-class list: --json)")
    return Group(*parts)

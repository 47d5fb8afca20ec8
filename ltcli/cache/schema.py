"""The feature cache's file format, defined once: datasets, attributes and what each is for.

Layout of one split's file::

    /features            N x D (or N x K x D with K views), float16 (default) or float32,
                         one contiguous block allocated in full when the file is created
    /labels              N int64
    /index               N int64: position of each row in the split's image list
    /classifier/weight   C x D float32 (the stage-1 linear classifier; absent when there is none)
    /classifier/bias     C float32
    attrs                see ATTRS below

Every list of attribute names the code needs (what a reader requires, what must agree for a
file to be resumed or reused, what is provenance, what the writer keeps for itself) is derived
from the one ATTRS table here.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..errors import LtcliError
from ..io import check_regular_file

FORMAT_VERSION = 1
DTYPES = {"float16": np.float16, "float32": np.float32}


@dataclass(frozen=True)
class Attr:
    name: str
    required: bool = False  # a reader refuses a file without it
    identity: bool = False  # must agree for a file to be resumed or reused
    provenance: bool = False  # copied into FeatureSet.attrs and shown by `ltcli info`
    writer: bool = False  # kept by the writer itself (not given by the job)
    shard: bool = False  # only on the per-rank shards of a distributed extraction
    meaning: str = ""


ATTRS: tuple[Attr, ...] = (
    Attr("format", required=True, identity=True, provenance=True, writer=True, meaning="FORMAT_VERSION"),
    Attr("split", required=True, identity=True, meaning="train, val or test"),
    Attr("class_names", required=True, identity=True, meaning="JSON list of names"),
    Attr("train_class_counts", required=True, identity=True, meaning="train images per class"),
    Attr("backbone_sha256", required=True, identity=True, provenance=True, meaning="sha256 of the backbone file"),
    Attr("data_fingerprint", required=True, identity=True, provenance=True, meaning="sha256 of the split's images"),
    Attr("dataset_id", identity=True, provenance=True, meaning="one id for every split of a dataset"),
    Attr("transform", required=True, identity=True, provenance=True, meaning="the preprocessing"),
    Attr("views", required=True, identity=True, provenance=True, meaning="augmented views per image"),
    Attr("arch", identity=True, provenance=True, meaning="backbone architecture"),
    Attr("seed", identity=True, provenance=True, meaning="seed of the augmented views"),
    Attr("stage1", provenance=True, meaning="where /classifier comes from"),
    Attr("batch_size", provenance=True, writer=True, meaning="rows per write (a resume keeps it)"),
    Attr("rows_done", writer=True, meaning="rows flushed (and fsynced) so far"),
    Attr("rows_sha256", writer=True, meaning="checksum chain of those rows, block by block"),
    Attr("complete", required=True, writer=True, meaning="True once every row is written"),
    Attr("shard_rank", identity=True, shard=True),
    Attr("shard_world", identity=True, shard=True),
    Attr("row_start", identity=True, shard=True),
    Attr("row_stop", identity=True, shard=True),
)
REQUIRED = tuple(a.name for a in ATTRS if a.required)
IDENTITY = tuple(a.name for a in ATTRS if a.identity)
PROVENANCE = tuple(a.name for a in ATTRS if a.provenance)
WRITER_KEPT = tuple(a.name for a in ATTRS if a.writer)
SHARD = tuple(a.name for a in ATTRS if a.shard)
# what must agree wherever artifacts meet (feature files, heads, predict's backbone)
SOURCE_KEYS = ("backbone_sha256", "dataset_id")

CACHE_BYTES = 32 << 20  # raw-data chunk cache per open file
READ_ROWS_BYTES = 64 << 20  # rows read per step when loading /features


def shard_path(out: str | os.PathLike, rank: int, world_size: int) -> Path:
    """Where rank `rank` of `world_size` writes its share of `out`."""
    return Path(f"{out}.rank{rank}-of-{world_size}.h5")


# --- the checksum chain behind rows_done (rows_sha256) ------------------------------------------------

CHAIN_START = hashlib.sha256(b"ltcli rows").hexdigest()


def chain_step(chain: str, rows: np.ndarray) -> str:
    """The checksum after one more block of rows: sha256(previous digest + the rows' bytes)."""
    return hashlib.sha256(chain.encode() + np.ascontiguousarray(rows).tobytes()).hexdigest()


def grid(start: int, stop: int, batch: int):
    """[s, e) of the batches of the grid 0, B, 2B, ... that lie in [start, stop)."""
    s = start
    while s < stop:
        e = min(stop, (s // batch + 1) * batch)
        yield s, e
        s = e



# --- values --------------------------------------------------------------------------------------


def plain(value: Any) -> Any:
    """h5py attribute values -> plain Python (str, int, float, bool, list)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        return [plain(v) for v in value.tolist()] if value.ndim else plain(value.item())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def short(value: Any) -> str:
    """A value as error messages show it, on one line: long strings and lists cut, control
    characters escaped."""
    if isinstance(value, str) and len(value) > 16:
        return repr(value[:12])[1:-1] + "…"
    if isinstance(value, (list, tuple, np.ndarray)):
        text = json.dumps(plain(value))
        return text if len(text) <= 40 else text[:37] + "…"
    return repr(plain(value))


# --- h5py errors as one line ---------------------------------------------------------------------


def first_line(exc: BaseException, limit: int = 160) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line[:limit]


def h5_reason(exc: BaseException) -> str:
    """The useful part of an h5py error: "Unable to open file (file signature not found)"
    -> "file signature not found"."""
    line = first_line(exc, 400)
    m = re.search(r"\(([^()]*)\)\s*$", line)
    return (m.group(1) if m else line)[:120]


def is_enospc(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    text = str(exc)
    return "No space left" in text or "errno = 28" in text


def open_h5(path: str | os.PathLike, mode: str = "r", **kwargs):
    """Open an existing features file; every failure is a one-line LtcliError."""
    import h5py

    path = Path(path)
    if path.is_dir():
        raise LtcliError(f"{path}: is a directory, expected a features .h5 file")
    check_regular_file(path, "features file")
    try:
        return h5py.File(path, mode, locking=False if mode == "r" else "best-effort", **kwargs)
    except OSError as exc:
        if isinstance(exc, PermissionError) or exc.errno in (errno.EACCES, errno.EPERM):
            raise LtcliError(f"{path}: not readable ({exc.strerror or first_line(exc)})") from None
        raise LtcliError(f"{path}: not a valid ltcli features file ({h5_reason(exc)})") from None


# --- validation ------------------------------------------------------------------------------------


def is_true(value) -> bool:
    """A stored boolean that is exactly True (the string "False" is not a truth value here)."""
    return isinstance(value, (bool, np.bool_)) and bool(value)


def attrs_of(f, path: Path) -> dict[str, Any]:
    """The file's attributes as plain values, checked; class_names decoded from JSON."""
    try:
        attrs = {k: plain(v) for k, v in f.attrs.items()}
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise LtcliError(f"{path}: corrupt features file (attributes unreadable: {h5_reason(exc)})") from None
    missing = [k for k in REQUIRED if k not in attrs]
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
    if len(names) > MAX_CLASSES:
        raise LtcliError(f"{path}: corrupt features file ({len(names):,} class names, beyond ltcli's bounds)")
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
    rows_done = attrs.get("rows_done", 0)
    if isinstance(rows_done, bool) or not isinstance(rows_done, int):
        raise LtcliError(f"{path}: corrupt features file (rows_done is {short(rows_done)}, not a row count)")
    complete = f.attrs["complete"]
    if not isinstance(complete, (bool, np.bool_)):
        raise LtcliError(f"{path}: corrupt features file (complete is {short(attrs['complete'])}, not a boolean)")
    attrs["complete"] = bool(complete)
    return attrs


def datasets_of(f, path: Path, attrs: Mapping[str, Any]):
    """(/features, /labels, /index) of an open file, their shapes and dtypes checked."""
    try:
        for name in ("features", "labels", "index"):
            if name not in f or not hasattr(f[name], "shape"):
                raise LtcliError(f"{path}: not an ltcli features file (missing dataset /{name})")
        feats, labels, index = f["features"], f["labels"], f["index"]
    except (KeyError, OSError, ValueError, RuntimeError) as exc:  # damaged metadata inside the file
        raise LtcliError(f"{path}: corrupt features file ({h5_reason(exc)})") from None
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


MAX_ROWS = 1 << 34  # rows, dimension and views are bounded before anything is allocated
MAX_DIM = 1 << 20
MAX_CLASSES = 1 << 22


def check_stored_size(f, feats, path: Path) -> None:
    """The shape a file declares against the bytes it stores: a tiny file declaring a huge
    /features (its chunks never written) is refused before anything is allocated."""
    shape = tuple(int(x) for x in feats.shape)
    if shape and (shape[0] > MAX_ROWS or shape[-1] > MAX_DIM or (len(shape) == 3 and shape[1] > 1 << 16)):
        raise LtcliError(f"{path}: corrupt features file (/features declares shape {shape}, beyond ltcli's bounds)")
    need = int(np.prod(shape, dtype=np.int64)) * feats.dtype.itemsize
    try:
        if feats.id.get_create_plist().get_nfilters():
            return  # compressed: stored bytes say nothing about the shape
        stored = feats.id.get_storage_size()
    except (AttributeError, OSError, RuntimeError):
        return
    if stored < need:
        raise LtcliError(f"{path}: corrupt features file (/features declares {shape} = {need:,} bytes but stores "
                         f"{stored:,})")


def job_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """A job's attributes as the file stores them: format set, class_names as JSON; every
    attribute the job must give is checked to be there (a programming error otherwise)."""
    out = dict(attrs)
    out["format"] = FORMAT_VERSION
    given = [a.name for a in ATTRS if not a.writer and not a.shard and a.required]
    missing = [k for k in given if k not in out]
    if missing:
        raise ValueError(f"feature cache attributes missing: {', '.join(missing)}")
    names = out.get("class_names")
    if not isinstance(names, str):
        out["class_names"] = json.dumps(list(names), ensure_ascii=False)
    return out

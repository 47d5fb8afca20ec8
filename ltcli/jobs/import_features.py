"""`ltcli import-features`: features computed elsewhere (CLIP, DINOv2, any backbone) as a cache
split of a run, so every head, tune-tau, eval, info and the provenance checks work on them.

Import the train split first: it fixes the classes, the train counts, the dataset id and the
backbone id (a content hash of the train features unless --backbone-id names it), which the
val and test imports then share. Without a --classifier, the baseline becomes a linear probe
fitted on the train features (`jobs/stage1.py`)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..arrays import first_non_finite_row, integer_labels, load_arrays, numeric, pick, read_names
from ..cache import FeatureWriter, read_attrs
from ..cache.schema import MAX_CLASSES, MAX_DIM
from ..errors import LtcliError
from ..options import Options, opt
from ..rundir import RunDir, dataset_id as make_dataset_id
from .common import log_event, run_info_base
from .stage1 import ensure_stage1

SPLITS = ("train", "val", "test")
BATCH = 4096


@dataclass(kw_only=True)
class ImportOptions(Options):
    command = "import-features"

    features: Path | None = opt(None, Path, "Features: .npy (N x D or N x K x D), or .npz / .pt / .safetensors "
                                "holding 'features' (and 'labels', 'class_names' as a JSON string, "
                                "'weight' / 'bias').", optional=True, argument=True)
    labels: Path | None = opt(None, Path, "Labels (N integers), if not in the features file.", optional=True)
    split: str = opt("train", str, "The split these rows are.", choices=SPLITS)
    class_names: Path | None = opt(None, Path, "Class names, one per line (or a JSON list); train only "
                                   "(default: class_0 ...).", optional=True)
    classifier: Path | None = opt(None, Path, "A stage-1 classifier: 'weight' C x D and optional 'bias' C "
                                  "(default: the baseline is a linear probe fitted on the train features).",
                                  optional=True)
    backbone_id: str | None = opt(None, str, "What identifies the backbone: a file (its sha256) or any text "
                                  "(default: a content hash of the train features).", optional=True)
    dataset_id: str | None = opt(None, str, "An id shared by every split of the dataset (default: a hash of the "
                                 "class names, train counts and train labels).", optional=True)
    dtype: str = opt("float16", str, "float16 (default) or float32.", choices=("float16", "float32"),
                     rule="must be float16 or float32")
    overwrite: bool = opt(False, bool, "Replace an existing file of this split.")

    def validate(self) -> None:
        if self.features is None:
            raise LtcliError("import-features: give the features file (FEATURES)")
        if self.class_names is not None and self.split != "train":
            raise LtcliError("--class-names: give it with the train split (it fixes the run's classes)")


@dataclass
class Imported:
    features: np.ndarray
    labels: np.ndarray
    names: list[str] | None
    weight: np.ndarray | None
    bias: np.ndarray | None


def _read_inputs(opts: ImportOptions) -> Imported:
    arrays = load_arrays(opts.features)
    feats = numeric(pick(arrays, opts.features, ("features", "feats", "x", "embeddings"), "features"),
                    opts.features, "features", (2, 3))
    n, d = int(feats.shape[0]), int(feats.shape[-1])
    if n == 0 or d == 0 or d > MAX_DIM:
        raise LtcliError(f"{opts.features}: features have shape {tuple(feats.shape)}")
    label_src, label_path = arrays, opts.features
    if opts.labels is not None:
        label_src, label_path = load_arrays(opts.labels), opts.labels
    labels = integer_labels(pick(label_src, label_path, ("labels", "targets", "y"), "labels"), label_path, n)
    bad = first_non_finite_row(feats)
    if bad is not None:
        raise LtcliError(f"{opts.features}: features contain NaN or inf (first at row {bad})")
    names = read_names(opts.class_names) if opts.class_names is not None else None
    if names is None and "class_names" in arrays:
        names = _names_from_array(arrays["class_names"], opts.features)
    weight = bias = None
    if opts.classifier is not None:
        w_arrays = load_arrays(opts.classifier)
        weight = numeric(pick(w_arrays, opts.classifier, ("weight", "w", "fc.weight"), "classifier weight"),
                         opts.classifier, "classifier weights", (2,)).astype(np.float32)
        b = pick(w_arrays, opts.classifier, ("bias", "b", "fc.bias"), "bias", required=False)
        bias = None if b is None or b is weight else numeric(b, opts.classifier, "bias", (1,)).astype(np.float32)
    return Imported(feats, labels, names, weight, bias)


def _names_from_array(arr, path) -> list[str]:
    try:
        text = bytes(np.asarray(arr, dtype=np.uint8)).decode("utf-8") if arr.dtype.kind in "ui" else str(arr)
        names = json.loads(text)
    except (ValueError, TypeError):
        raise LtcliError(f"{path}: 'class_names' is not a JSON list of names (as UTF-8 bytes)") from None
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise LtcliError(f"{path}: 'class_names' is not a JSON list of names")
    return names


def _content_hash(feats: np.ndarray, labels: np.ndarray) -> str:
    h = hashlib.sha256(str(feats.shape).encode() + str(feats.dtype).encode())
    for s in range(0, feats.shape[0], BATCH):
        h.update(np.ascontiguousarray(feats[s : s + BATCH]).tobytes())
    h.update(labels.tobytes())
    return h.hexdigest()


def _backbone_id(value: str | None, default: str) -> str:
    if value is None:
        return default
    p = Path(value)
    if p.is_file():
        from ..rundir import file_sha256

        return file_sha256(p)
    return hashlib.sha256(value.encode()).hexdigest()


def run(opts: ImportOptions, run_dir: RunDir) -> Path:
    with run_dir.writing(create=True):
        return _run(opts, run_dir)


def _run(opts: ImportOptions, run_dir: RunDir) -> Path:
    x = _read_inputs(opts)
    fingerprint = _content_hash(x.features, x.labels)
    if opts.split == "train":
        names = x.names or [f"class_{i}" for i in range(int(x.labels.max()) + 1)]
        if len(names) > MAX_CLASSES:
            raise LtcliError(f"{opts.features}: {len(names):,} classes, beyond ltcli's bounds")
        counts = np.bincount(x.labels, minlength=len(names))
        if len(counts) > len(names):
            raise LtcliError(f"{opts.labels or opts.features}: label {int(x.labels.max())} out of range for "
                             f"{len(names)} class names")
        if (counts == 0).any():
            j = int(np.flatnonzero(counts == 0)[0])
            raise LtcliError(f"{opts.labels or opts.features}: class {j} ('{names[j]}') has no train sample")
        counts = counts.tolist()
        backbone = _backbone_id(opts.backbone_id, fingerprint)
        data_id = opts.dataset_id or make_dataset_id("imported", names, counts, fingerprint)
    else:
        train = read_attrs(_train_file(run_dir))
        names, counts = train["class_names"], train["train_class_counts"]
        backbone = _backbone_id(opts.backbone_id, train["backbone_sha256"])
        data_id = opts.dataset_id or train.get("dataset_id")
        if len(x.labels) and int(x.labels.max()) >= len(names):
            raise LtcliError(f"{opts.labels or opts.features}: label {int(x.labels.max())} out of range for the "
                             f"run's {len(names)} classes")
        if int(x.features.shape[-1]) != _train_dim(run_dir):
            raise LtcliError(f"{opts.features}: D={x.features.shape[-1]}, the run's train features have "
                             f"D={_train_dim(run_dir)}")
    if x.weight is not None and x.weight.shape != (len(names), x.features.shape[-1]):
        raise LtcliError(f"{opts.classifier}: weight is {tuple(x.weight.shape)}, expected C x D = "
                         f"({len(names)}, {x.features.shape[-1]})")
    if x.bias is not None and x.bias.shape != (len(names),):
        raise LtcliError(f"{opts.classifier}: bias has shape {tuple(x.bias.shape)}, expected ({len(names)},)")
    out = run_dir.features(opts.split)
    _write(opts, out, x, names, counts, backbone, data_id, fingerprint)
    if opts.split == "train":
        _write_run_json(run_dir, opts, names, counts, data_id, int(x.features.shape[-1]))
    if _train_file(run_dir, required=False):
        ensure_stage1(run_dir)
    log_event(run_dir, {"event": "import-features", "split": opts.split, "features": str(out),
                        "rows": int(x.features.shape[0]), "source": str(opts.features)})
    return out


def _write(opts, out, x: Imported, names, counts, backbone, data_id, fingerprint) -> None:
    views = 1 if x.features.ndim == 2 else int(x.features.shape[1])
    attrs = {"split": opts.split, "class_names": names, "train_class_counts": counts, "backbone_sha256": backbone,
             "data_fingerprint": fingerprint, "dataset_id": data_id, "transform": f"imported from {opts.features}",
             "views": views, "arch": "imported", "seed": 0,
             "stage1": "imported" if x.weight is not None else "none"}
    n = int(x.features.shape[0])
    with FeatureWriter(out, rows=n, dim=int(x.features.shape[-1]), labels=x.labels, index=np.arange(n),
                       attrs=attrs, views=views, dtype=opts.dtype, weight=x.weight, bias=x.bias, batch_size=BATCH,
                       overwrite=opts.overwrite) as w:
        if not w.reused:
            for s in range(w.rows_done, n, w.batch_size):
                w.write(s, np.asarray(x.features[s : s + w.batch_size]))
            w.finish()


def _train_file(run_dir: RunDir, required: bool = True) -> Path | None:
    path = run_dir.features("train")
    if path.exists():
        return path
    if required:
        raise LtcliError(f"{path}: not found; import the train split first (it fixes the classes and counts)")
    return None


def _train_dim(run_dir: RunDir) -> int:
    from ..cache import open_h5

    with open_h5(run_dir.features("train")) as f:
        return int(f["features"].shape[-1])


def _write_run_json(run_dir: RunDir, opts, names, counts, data_id, dim) -> None:
    info = run_info_base("import-features")
    info.update({"data": {"spec": f"imported:{opts.features}"}, "arch": "imported", "num_classes": len(names),
                 "feature_dim": dim, "class_names": names, "train_counts": counts, "dataset_id": data_id,
                 "splits": {"train": int(sum(counts))}})
    run_dir.write(info)

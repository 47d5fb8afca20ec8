"""load_dataset: spec -> source listing -> val hold-out and long-tail subsampling -> Dataset."""

from __future__ import annotations

import math

import numpy as np

from ..errors import LtcliError
from .longtail import longtail_counts, select
from .sources import load_cifar, load_imagefolder, load_inat, load_list
from .spec import parse_spec
from .synthetic import class_factors, generate_split
from .types import DataConfig, Dataset, Split


def _check_config(cfg: DataConfig) -> None:
    f = cfg.imbalance_factor
    if f is not None and (not isinstance(f, (int, float)) or not math.isfinite(f) or f < 1):
        raise LtcliError(f"--imbalance-factor {f}: must be a finite number >= 1")
    if cfg.val_per_class < 0:
        raise LtcliError(f"--val-per-class {cfg.val_per_class}: must be >= 0")


def load_dataset(cfg: DataConfig) -> Dataset:
    """Build the Dataset a `--data SPEC` names. File-backed images are listed, not decoded."""
    _check_config(cfg)
    ds = parse_spec(cfg.spec)
    if ds.kind == "synthetic":
        return _load_synthetic(cfg)
    if ds.kind == "imagefolder":
        src = load_imagefolder(ds, cfg.spec)
    elif ds.kind == "list":
        src = load_list(ds, cfg.spec, cfg.allow_outside_root)
    elif ds.kind == "inat":
        src = load_inat(ds, cfg.spec, cfg.allow_outside_root)
    else:
        src = load_cifar(ds, cfg.spec)

    if len(src.class_names) < 2:
        raise LtcliError(f"--data {cfg.spec}: holds {len(src.class_names)} class; long-tailed recognition needs "
                         "at least 2")
    splits = dict(src.splits)
    train = splits["train"]
    if cfg.val_per_class and "val" in splits:
        raise LtcliError(
            f"--val-per-class {cfg.val_per_class}: data '{cfg.spec}' already has a val split "
            "(drop the option, or the data's own val split)"
        )
    if cfg.val_per_class or cfg.imbalance_factor is not None:
        sel = select(train.labels, train.keys, src.class_names, cfg.seed,
                     cfg.val_per_class, cfg.imbalance_factor)
        if cfg.val_per_class:
            splits["val"] = train.subset(sel.val, name="val")
        splits["train"] = train.subset(sel.train)
        counts, warnings = sel.train_counts, sel.warnings
    else:
        counts = np.bincount(train.labels, minlength=len(src.class_names)).tolist()
        warnings = []
    ordered = {name: splits[name].verified(cfg.verify) for name in ("train", "val", "test") if name in splits}
    return Dataset(cfg.spec, src.class_names, ordered, counts, src.native_size, [], warnings)


def _load_synthetic(cfg: DataConfig) -> Dataset:
    """Generated directly at the target counts: train follows the long-tail profile
    (--imbalance-factor, else synthetic_imbalance); val (--val-per-class, else
    synthetic_val_per_class) and test are balanced and drawn independently."""
    c, size = cfg.num_classes, cfg.image_size
    if c < 2:
        raise LtcliError(f"--synthetic-classes {c}: synthetic data needs at least 2 classes")
    if c > 1000:
        raise LtcliError(f"--synthetic-classes {c}: synthetic data has at most 1000 classes")
    if not 8 <= size <= 256:
        raise LtcliError(f"--synthetic-size {size}: synthetic images must be 8..256 px")
    if cfg.synthetic_max_per_class < 1:
        raise LtcliError(f"synthetic max per class {cfg.synthetic_max_per_class}: must be >= 1")
    imbalance = cfg.imbalance_factor if cfg.imbalance_factor is not None else cfg.synthetic_imbalance
    counts = [max(1, n) for n in longtail_counts(cfg.synthetic_max_per_class, c, imbalance)]
    per_split = {
        "train": counts,
        "val": [cfg.val_per_class or cfg.synthetic_val_per_class] * c,
        "test": [cfg.synthetic_test_per_class] * c,
    }
    factors = class_factors(c, cfg.seed)
    splits = {}
    for name, split_counts in per_split.items():
        if sum(split_counts) == 0:
            continue
        images, labels = generate_split(split_counts, size, cfg.seed, name, factors)
        splits[name] = Split(name, labels, images=images)
    width = max(2, len(str(c - 1)))
    names = [f"class_{i:0{width}d}" for i in range(c)]
    return Dataset(cfg.spec, names, splits, counts, size, [], [])

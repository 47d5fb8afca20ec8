"""Checks that artifacts meeting in one stage come from the same backbone and data."""

from __future__ import annotations

import os
from typing import Any, Mapping

from ..errors import LtcliError
from .reader import read_attrs
from .schema import DTYPES, SOURCE_KEYS, open_h5, short


def _describe(item) -> tuple[str, dict[str, Any], int | None]:
    if isinstance(item, (str, os.PathLike)):
        attrs = read_attrs(item)
        with open_h5(item) as f:
            dim = f["features"].shape[-1] if "features" in f else None
        return str(item), attrs, dim
    attrs = dict(getattr(item, "attrs", {}) or {})
    attrs.setdefault("class_names", list(item.class_names))
    name = str(attrs.get("path", f"<{getattr(item, 'split', 'features')} features>"))
    return name, attrs, int(item.features.shape[-1])


def check_same_source(name_a: str, attrs_a: Mapping[str, Any], name_b: str, attrs_b: Mapping[str, Any]) -> None:
    """Refuse two things (feature files, heads) made by different backbones or from different
    data: compares backbone_sha256 and dataset_id where both sides record them."""
    for key in SOURCE_KEYS:
        what = "backbones" if key == "backbone_sha256" else "datasets"
        va, vb = attrs_a.get(key), attrs_b.get(key)
        if va is not None and vb is not None and va != vb:
            raise LtcliError(f"{name_a} and {name_b} come from different {what} ({key} {short(va)} vs {short(vb)})")


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

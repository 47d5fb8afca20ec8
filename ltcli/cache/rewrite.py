"""Rewriting a complete feature file with a stage-1 classifier (`jobs/stage1.py`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .reader import read_attrs
from .schema import ATTRS, grid, open_h5
from .writer import FeatureWriter


def rewrite_with_classifier(path: Path, weight: torch.Tensor, bias: torch.Tensor | None, stage1: str) -> Path:
    """Give a complete feature file a stage-1 classifier (for a backbone ltcli did not train, the
    linear probe): the rows are copied into a new file, renamed over the old one when complete,
    so a crash leaves the old file intact."""
    attrs = read_attrs(path)
    kept = {a.name for a in ATTRS if not a.writer and not a.shard}
    job = {k: v for k, v in attrs.items() if k in kept}
    job["stage1"] = stage1
    with open_h5(path) as f:
        feats = f["features"]
        labels, index = np.asarray(f["labels"][()]), np.asarray(f["index"][()])
        dtype = "float16" if feats.dtype == np.float16 else "float32"
        batch = int(attrs.get("batch_size") or 256)
        with FeatureWriter(path, rows=feats.shape[0], dim=feats.shape[-1], labels=labels, index=index, attrs=job,
                           views=int(attrs["views"]), dtype=dtype, weight=weight, bias=bias, batch_size=batch,
                           overwrite=True, quiet=True) as w:
            for s, e in grid(w.rows_done, w.rows, w.batch_size):
                w.write(s, np.asarray(feats[s:e]))
            w.finish()
    return path

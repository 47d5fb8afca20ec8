"""`ltcli info`: what a feature cache holds, for people (a table) and scripts (JSON)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..errors import LtcliError
from ..groups import GROUP_NAMES, shot_groups
from .schema import PROVENANCE, SHARD, attrs_of, check_stored_size, datasets_of, h5_reason, open_h5


def info(path: str | os.PathLike, *, many: float = 100, few: float = 20) -> dict[str, Any]:
    """A JSON-ready summary of a features file, complete or not (for `ltcli info`)."""
    path = Path(path)
    with open_h5(path) as f:
        attrs = attrs_of(f, path)
        feats, labels_ds, _ = datasets_of(f, path, attrs)
        check_stored_size(f, feats, path)
        try:
            labels = np.asarray(labels_ds[()], dtype=np.int64)
            has_w = "classifier" in f and "weight" in f["classifier"]
            w_shape = list(f["classifier"]["weight"].shape) if has_w else None
        except (OSError, KeyError, ValueError, RuntimeError) as exc:
            raise LtcliError(f"{path}: corrupt or truncated features file ({h5_reason(exc)})") from None
        shape = list(feats.shape)
        dtype = str(np.dtype(feats.dtype))
        chunks = list(feats.chunks) if feats.chunks else None
    names = attrs["class_names"]
    counts = attrs["train_class_counts"]
    c = len(names)
    if len(labels) and (labels.min() < 0 or labels.max() >= c):
        raise LtcliError(f"{path}: corrupt features file (labels outside 0..{c - 1})")
    rows_per_class = np.bincount(labels, minlength=c) if c else np.zeros(0, np.int64)
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
        "provenance": {k: attrs.get(k) for k in PROVENANCE if k not in ("format", "views")},
        "size_bytes": path.stat().st_size,
    }
    if "shard_rank" in attrs:
        out["shard"] = {k: attrs.get(k) for k in SHARD}
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

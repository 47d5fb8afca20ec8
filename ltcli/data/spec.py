"""Parse a `--data SPEC` string into its kind and arguments (no file-system access)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import LtcliError

KINDS_HELP = (
    "synthetic, imagefolder:ROOT, list:ROOT:TRAIN.txt[,VAL.txt[,TEST.txt]], inat:ROOT, "
    "cifar10[:ROOT], cifar100[:ROOT]"
)
LIST_SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class DataSpec:
    kind: str                           # synthetic | imagefolder | list | inat | cifar10 | cifar100
    root: str | None = None
    lists: tuple[str | None, ...] = ()  # list kind: train, val, test list files (None = absent)


def parse_spec(spec: str) -> DataSpec:
    """`kind[:args]` -> DataSpec; LtcliError naming --data for anything malformed."""
    spec = spec.strip()
    kind, sep, rest = spec.partition(":")
    kind = kind.lower()
    if kind == "synthetic":
        if rest:
            raise LtcliError(f"--data {spec}: 'synthetic' takes no argument")
        return DataSpec("synthetic")
    if kind in ("cifar10", "cifar100"):
        return DataSpec(kind, root=rest or None)
    if kind in ("imagefolder", "inat"):
        if not rest:
            raise LtcliError(f"--data {spec}: expected {kind}:ROOT")
        return DataSpec(kind, root=rest)
    if kind == "list":
        # ROOT may itself contain ':'; the list-file names after the last ':' may not.
        root, sep2, files = rest.rpartition(":")
        if not sep2 or not root or not files:
            raise LtcliError(f"--data {spec}: expected list:ROOT:TRAIN.txt[,VAL.txt[,TEST.txt]]")
        names = [f.strip() or None for f in files.split(",")]
        if len(names) > 3:
            raise LtcliError(f"--data {spec}: at most three list files (train, val, test)")
        if names[0] is None:
            raise LtcliError(f"--data {spec}: the train list file is required")
        return DataSpec("list", root=root, lists=tuple(names))
    raise LtcliError(f"--data {spec}: unknown data kind '{kind}' (known: {KINDS_HELP})")


def resolve_spec(spec: str) -> str:
    """The same spec with every path made absolute, so run.json works from any directory."""
    ds = parse_spec(spec)
    if ds.kind == "synthetic" or ds.root is None:
        return spec.strip()
    root = os.path.abspath(ds.root)
    if ds.kind == "list":
        files = ",".join(os.path.abspath(f) if f else "" for f in ds.lists)
        return f"list:{root}:{files}"
    return f"{ds.kind}:{root}"

"""Checks made where artifacts meet, before anything is written: a job never replaces a file
it did not make for the same purpose, and never mixes artifacts of different backbones."""

from __future__ import annotations

from pathlib import Path

from ..cache.schema import short
from ..errors import LtcliError
from ..io import safe_torch_load
from ..rundir import RunDir, file_sha256

_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def run_backbone_sha256(run_dir: RunDir) -> str | None:
    """sha256 of the run's backbone.pt, or None when the run has none (imported features)."""
    return file_sha256(run_dir.backbone) if run_dir.backbone.is_file() else None


def check_features_belong_to_run(run_dir: RunDir, fs, features_path: Path) -> None:
    """A head written into RUN/heads must come from the run's own backbone: otherwise it would
    replace the run's head with one that no file of the run can be evaluated with."""
    sha = run_backbone_sha256(run_dir)
    theirs = fs.attrs.get("backbone_sha256")
    if sha is not None and theirs is not None and theirs != sha:
        raise LtcliError(
            f"{features_path}: comes from another backbone than {run_dir.backbone} (backbone_sha256 "
            f"{short(theirs)} vs {short(sha)}); a head fitted on it would replace the run's: pass --out FILE"
        )


def file_kind(path: Path) -> str:
    """'missing', 'directory', 'hdf5', 'head', 'checkpoint' or 'other' (what a path holds)."""
    if not path.exists() and not path.is_symlink():
        return "missing"
    if path.is_dir():
        return "directory"
    if not path.is_file():
        return "other"
    with open(path, "rb") as fh:
        if fh.read(8) == _HDF5_MAGIC:
            return "hdf5"
    try:
        payload = safe_torch_load(path, "file")
    except LtcliError:
        return "other"
    if isinstance(payload, dict) and {"format", "method", "state"} <= set(payload):
        return "head"
    if isinstance(payload, dict) and payload.get("kind") == "ltcli-backbone":
        return "checkpoint"
    return "other"


def check_replaceable_head(path: Path) -> None:
    """--out may replace a head file (refitting), never a file of another kind."""
    kind = file_kind(path)
    if kind in ("missing", "directory", "head"):
        return  # a directory fails at the write with its own one-line message
    what = {"hdf5": "a features file", "checkpoint": "a backbone checkpoint"}.get(kind, "not an ltcli head file")
    raise LtcliError(f"{path}: exists and is {what}; refusing to replace it with a head (choose another --out)")

"""What several jobs share: the run's event log, head provenance, the software environment."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..cache.schema import SOURCE_KEYS
from ..errors import LtcliError
from ..io import read_path_arg
from ..rundir import RUN_FORMAT, RunDir


def log_event(run: RunDir | None, event: dict) -> None:
    """One record in RUN/metrics.jsonl (and the CSV / TensorBoard mirrors), if the run exists."""
    if run is not None and run.root.exists():
        run.log_event(event)


def head_provenance(fs, features_path: Path, extra: dict | None = None) -> dict:
    """What a head file records about the features it was fitted on."""
    prov = {
        "features": str(features_path),
        **{k: fs.attrs.get(k) for k in SOURCE_KEYS},
        "class_names": list(fs.class_names),
        "feature_dim": fs.dim,
        "num_classes": fs.num_classes,
        "feature_dtype": fs.attrs.get("dtype"),
        "stage1": fs.attrs.get("stage1"),
    }
    prov.update(extra or {})
    return {k: v for k, v in prov.items() if v is not None}


def environment(device: torch.device | None = None) -> dict[str, Any]:
    """Versions a run depends on (recorded in run.json and the train-start event)."""
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    try:
        import torchvision

        env["torchvision"] = torchvision.__version__
    except ImportError:  # pragma: no cover - a declared dependency
        pass
    try:
        from ..faiss_index import backend_name

        env["faiss"] = backend_name()
    except LtcliError:
        env["faiss"] = None
    if device is not None and device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def run_info_base(created_by: str) -> dict[str, Any]:
    return {"format": RUN_FORMAT, "ltcli_version": __version__, "created_by": created_by,
            "environment": environment()}


def input_path(value: str | Path | None, what: str, default: Path) -> Path:
    """An input path option: given, '-' (one path from stdin), or the run's default."""
    if value is None:
        return Path(default)
    return Path(read_path_arg(str(value), what))

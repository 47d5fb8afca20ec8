"""What several jobs share: the run's event log, head provenance, the software environment."""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..cache.schema import SOURCE_KEYS
from ..data import DataConfig
from ..options import SEED_RULE, Options, opt
from ..errors import LtcliError
from ..io import read_path_arg
from ..rundir import RUN_FORMAT, RunDir


DATA_HELP = ("Dataset: synthetic (built-in), imagefolder:ROOT, list:ROOT:TRAIN.txt[,VAL.txt[,TEST.txt]], "
             "inat:ROOT, cifar10, cifar100.")


@dataclass(kw_only=True)
class DataOptions(Options):
    """Which images, and the long-tailed profile taken of them."""

    data: str = opt("synthetic", str, DATA_HELP)
    imbalance_factor: float | None = opt(None, float, "Subsample train to n_i = n_max * IF^(-i/(C-1)) (IF >= 1).",
                                         min=1.0, optional=True)
    val_per_class: int = opt(0, int, "Hold out K images per class as a balanced val split (before subsampling); "
                             "a class gives min(K, n - 1), never its last train image.", min=0, max=1_000_000)
    seed: int = opt(0, int, "Seeds data selection, init, sampling and augmentation.", min=0, max=2**63 - 1,
                    rule=SEED_RULE)
    skip_bad_images: bool = opt(False, bool, "Skip unreadable images (recorded in run.json) instead of failing.")
    verify: bool = opt(False, bool, "Fingerprint the images by their bytes (sha256), not only by size and "
                       "modification time (slower; catches a file rewritten with the same size and time).")
    allow_outside_root: bool = opt(False, bool, "Let list-file paths point outside ROOT.")
    synthetic_classes: int | None = opt(None, int, "Classes of the synthetic dataset (default 10).", optional=True)
    synthetic_size: int | None = opt(None, int, "Image side of the synthetic dataset (default 32).", optional=True)

    def data_config(self) -> DataConfig:
        extra = {}
        if self.synthetic_classes is not None:
            extra["num_classes"] = self.synthetic_classes
        if self.synthetic_size is not None:
            extra["image_size"] = self.synthetic_size
        return DataConfig(spec=self.data, seed=self.seed, imbalance_factor=self.imbalance_factor,
                          val_per_class=self.val_per_class, skip_bad_images=self.skip_bad_images,
                          allow_outside_root=self.allow_outside_root, verify=self.verify, **extra)


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


def dataset_run_info(created_by: str, dataset, data_cfg, *, arch: str, feature_dim: int) -> dict[str, Any]:
    """The run.json fields every run has: the data, its classes and counts, fingerprints."""
    import dataclasses

    from ..rundir import dataset_id

    info = run_info_base(created_by)
    counts = list(map(int, dataset.train_counts))
    info.update({
        "data": dataclasses.asdict(data_cfg),
        "arch": arch,
        "num_classes": dataset.num_classes,
        "feature_dim": int(feature_dim),
        "class_names": list(dataset.class_names),
        "train_counts": counts,
        "splits": {name: len(s) for name, s in dataset.splits.items()},
        "fingerprints": {name: s.fingerprint() for name, s in dataset.splits.items()},
        "skipped_images": list(dataset.skipped),
    })
    info["dataset_id"] = dataset_id(data_cfg.spec, info["class_names"], counts, info["fingerprints"]["train"])
    return info


def run_backbone(run_dir: RunDir, info: dict, checkpoint: Path | None = None):
    """(model, checkpoint path) of a run's backbone: --checkpoint, RUN/backbone.pt, or the
    weights file a run of a backbone ltcli did not train records (extract --arch)."""
    from ..checkpoint import load_backbone, model_from_checkpoint
    from ..models import build_model

    foreign = info.get("backbone") if isinstance(info.get("backbone"), dict) else None
    if checkpoint is None and not run_dir.backbone.exists() and foreign:
        path = Path(foreign["checkpoint"])
        model = build_model(foreign["arch"], len(info["class_names"]), weights=str(path))
        model.has_classifier = False
        return model, path
    path = Path(checkpoint or run_dir.backbone)
    if not path.exists() and checkpoint is None and info.get("arch") == "imported":
        raise LtcliError(f"{run_dir.root}: its features were imported; there is no backbone to run images "
                         "through (use --features-only)")
    return model_from_checkpoint(load_backbone(path), path), path


def input_path(value: str | Path | None, what: str, default: Path) -> Path:
    """An input path option: given, '-' (one path from stdin), or the run's default."""
    if value is None:
        return Path(default)
    return Path(read_path_arg(str(value), what))

"""`ltcli extract`: run the backbone once over each split and cache its features (HDF5).

Resumable (rerun the same command after a crash), reused when complete, refused when it
would mix backbones. Under torchrun the split is sharded across ranks."""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import DataConfig, load_dataset
from ..errors import LtcliError
from ..inputs import input_size, probe_native_size
from ..options import opt, or_list, seed_opt
from ..rundir import RunDir, dataset_id as make_dataset_id, file_sha256
from ..runtime import AMP_HELP, DEVICE_HELP, init_distributed, local_device, resolve_device, shutdown_distributed
from .common import DataOptions, dataset_run_info, log_event
from .stage1 import ensure_stage1

SPLITS = ("train", "val", "test")


@dataclass(kw_only=True)
class ExtractOptions(DataOptions):
    """The data options (--imbalance-factor, --val-per-class, ...) are used only when extract
    creates a run for a backbone ltcli did not train (--arch on a --run without run.json)."""

    command = "extract"

    data: str | None = opt(None, str, "Override the data spec recorded in run.json (same classes); for a new "
                           "run with --arch, its data (default synthetic).", optional=True)
    split: list = opt(["train"], list, "train, val or test (repeat or comma-separate for several; 'all' for "
                      "every split the data has).")
    checkpoint: Path | None = opt(None, Path, "Backbone checkpoint (default RUN/backbone.pt); with --arch, any "
                                  "weights file (.pth, .pt, .safetensors, a timm or torchvision checkpoint).",
                                  optional=True)
    arch: str | None = opt(None, str, "The architecture of a --checkpoint ltcli did not train (`ltcli archs`); "
                           "the joint head is then a linear probe fitted on the train features.", optional=True)
    image_size: int | None = opt(None, int, "Input side for a backbone ltcli did not train (default: native "
                                 "for small images, 224 otherwise).", min=8, max=4096, optional=True)
    out: Path | None = opt(None, Path, "Output .h5 (one --split only; default RUN/features/SPLIT.h5).", optional=True)
    dtype: str = opt("float16", str, "float16 (default) or float32.", choices=("float16", "float32"),
                     rule="must be float16 or float32")
    views: int = opt(1, int, "K seeded augmented views per image (for cRT / LWS on augmented features).", min=1,
                     max=1024)
    batch_size: int = opt(256, int, "Images per forward; a resumed file keeps the batch size it started with.", min=1,
                          max=1 << 16)
    device: str = opt("auto", str, DEVICE_HELP)
    amp: str = opt("auto", str, AMP_HELP)
    workers: int = opt(4, int, "Decode / loader worker processes.", min=0, max=256)
    gpu_decode: bool = opt(False, bool, "Decode JPEGs on the GPU (ImageNet-sized data).")
    seed: int = dataclasses.field(default=0, metadata={"opt": seed_opt("Seed of the augmented views (and of the "
                                                                         "data selection of a new run).")})
    skip_bad_images: bool | None = opt(None, bool, "Skip unreadable images (default: as in run.json).", optional=True)
    overwrite: bool = opt(False, bool, "Rewrite a complete file instead of reusing it.")

    def splits(self, run_splits) -> list[str]:
        names = [s.strip() for item in self.split for s in item.split(",") if s.strip()]
        for s in names:
            if s not in SPLITS + ("all",):
                raise LtcliError(f"--split {s}: choose {or_list(SPLITS + ('all',))}")
        if "all" in names:
            names = [s for s in SPLITS if s in run_splits]
        if self.out is not None and len(names) != 1:
            raise LtcliError("--out: give exactly one --split when naming the output file")
        return names


def run_data_config(info: dict, data_override: str | None, skip_bad: bool | None) -> DataConfig:
    """The run's data, as run.json records it (optionally another spec with the same classes)."""
    fields = dict(info.get("data") or {})
    known = {f.name for f in dataclasses.fields(DataConfig)}
    cfg = DataConfig(**{k: v for k, v in fields.items() if k in known})
    if data_override:
        cfg.spec = data_override
    if skip_bad is not None:
        cfg.skip_bad_images = skip_bad
    return cfg


def run(opts: ExtractOptions, run_dir: RunDir) -> list[Path]:
    """Run the backbone over each split once and cache the features."""
    from ..runtime import process_rank

    with run_dir.writing(create=opts.arch is not None) if process_rank() == 0 else contextlib.nullcontext():
        return _run(opts, run_dir)


def _load_backbone(opts: ExtractOptions, run_dir: RunDir, num_classes: int | None):
    """(model, checkpoint path, its sha256, arch) of the backbone to extract with: ltcli's own
    checkpoint, or (with --arch) any weights file, whose fresh classifier is not a stage-1 one."""
    # imported here: torchvision costs every other command (and --help) a second
    from ..checkpoint import load_backbone, model_from_checkpoint
    from ..models import build_model

    ckpt_path = Path(opts.checkpoint or run_dir.backbone)
    if not ckpt_path.exists():
        raise LtcliError(f"{ckpt_path}: checkpoint not found; run `ltcli train-backbone --run {run_dir.root}` "
                         "first or pass --checkpoint")
    if opts.arch is None:
        try:
            ckpt = load_backbone(ckpt_path)
        except LtcliError as exc:
            if "not an ltcli backbone checkpoint" in str(exc):
                raise LtcliError(f"{exc}; pass --arch NAME to extract with a backbone ltcli did not train") from None
            raise
        if num_classes is not None and int(ckpt["num_classes"]) != num_classes:
            raise LtcliError(f"{ckpt_path}: checkpoint has {ckpt['num_classes']} classes, "
                             f"{run_dir.run_json} has {num_classes}")
        return model_from_checkpoint(ckpt, ckpt_path), ckpt_path, file_sha256(ckpt_path), ckpt["arch"]
    model = build_model(opts.arch, max(1, num_classes or 1), weights=str(ckpt_path))
    model.has_classifier = False
    return model, ckpt_path, file_sha256(ckpt_path), model.arch


def _new_run(opts: ExtractOptions, run_dir: RunDir, model, sha: str, ckpt_path: Path) -> dict:
    """run.json for a run whose backbone ltcli did not train (extract --arch on a new --run)."""
    data_cfg = dataclasses.replace(opts.data_config(), spec=opts.data or "synthetic")
    dataset = load_dataset(data_cfg)
    size, _ = input_size(dataset.native_size or probe_native_size(dataset.split("train")), opts.image_size)
    info = dataset_run_info("extract", dataset, data_cfg, arch=model.arch, feature_dim=model.feature_dim)
    info.update(image_size=size, backbone={"checkpoint": str(ckpt_path), "sha256": sha, "arch": model.arch,
                                           "stage1": "none (a linear probe is fitted on the train features)"})
    run_dir.root.mkdir(parents=True, exist_ok=True)
    run_dir.write(info)
    return info


def _run(opts: ExtractOptions, run_dir: RunDir) -> list[Path]:
    from ..extraction import extract_split

    ckpt_path = Path(opts.checkpoint or run_dir.backbone)
    if not ckpt_path.exists():  # the first thing a user without a trained run needs to hear
        raise LtcliError(f"{ckpt_path}: checkpoint not found; run `ltcli train-backbone --run {run_dir.root}` "
                         "first or pass --checkpoint")
    if opts.arch is not None and run_dir.backbone.exists():
        raise LtcliError(f"--arch {opts.arch}: {run_dir.root} holds a backbone ltcli trained (backbone.pt); extract "
                         "a backbone it did not train into a new --run")
    if opts.arch is not None and not run_dir.run_json.exists():
        model, ckpt_path, sha, arch = _load_backbone(opts, run_dir, None)
        info = _new_run(opts, run_dir, model, sha, ckpt_path)
        model.fc = torch.nn.Linear(model.feature_dim, len(info["class_names"]))
    else:
        info = run_dir.read()
        model, ckpt_path, sha, arch = _load_backbone(opts, run_dir, len(info["class_names"]))
    splits = opts.splits(info.get("splits", {}))
    foreign = not getattr(model, "has_classifier", True)
    if foreign and "train" not in splits and opts.out is None:
        splits = ["train"] + splits  # the linear probe that stands in for stage 1 is fitted on train
    device = resolve_device(opts.device)
    dist_info = init_distributed(str(device))
    device = local_device(device, dist_info)
    data_cfg = run_data_config(info, opts.data, opts.skip_bad_images)
    dataset = load_dataset(data_cfg)
    if list(dataset.class_names) != list(info["class_names"]):
        raise LtcliError(f"--data {opts.data or info['data']['spec']}: its classes differ from the run's "
                         f"({len(dataset.class_names)} vs {len(info['class_names'])} classes, or other names)")
    data_id = _dataset_id(info, dataset, opts.data)
    size = opts.image_size or info.get("image_size")
    written = []
    for name in sorted(splits, key=SPLITS.index):
        path = Path(opts.out or run_dir.features(name))
        extract_split(
            model, dataset.split(name), path, backbone_sha256=sha, class_names=info["class_names"],
            train_counts=info["train_counts"], dataset_id=data_id, arch=arch, device=device,
            size=size, in_memory=None if size is None else input_size(size)[1], progress=dist_info.is_main,
            skip_bad=data_cfg.skip_bad_images, dtype=opts.dtype, views=opts.views, batch_size=opts.batch_size,
            amp=opts.amp, workers=opts.workers, gpu_decode=opts.gpu_decode, seed=opts.seed, overwrite=opts.overwrite,
            stage1="trained" if not foreign else "none",
        )
        written.append(path)
        if dist_info.is_main and opts.out is None:
            log_event(run_dir, {"event": "extract", "split": name, "features": str(path),
                                "rows": len(dataset.split(name))})
    if foreign and dist_info.is_main and opts.out is None:
        ensure_stage1(run_dir)
    shutdown_distributed(dist_info)
    return written


def _dataset_id(info: dict, dataset, data_override: str | None) -> str:
    train_fp = dataset.split("train").fingerprint() if "train" in dataset.splits else None
    if train_fp == info.get("fingerprints", {}).get("train"):
        return info["dataset_id"]
    # another dataset with the same classes: its files must not mix with the run's
    return make_dataset_id(data_override or "", info["class_names"], info["train_counts"], train_fp or "")

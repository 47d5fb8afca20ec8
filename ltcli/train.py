"""Stage 1: train the backbone and its joint classifier (train-backbone).

Small images are decoded once into a uint8 tensor that lives on the training
device, and augmentation runs there too, so the GPU never waits for JPEG
decoding. Large images stream through a DataLoader with worker processes.
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from . import __version__
from .console import err_console, progress_bar
from .device import amp_dtype, resolve_device  # noqa: F401 (re-exported for callers)
from .data import DataConfig, Dataset, SplitDataset, collate_skip, decode_split, load_dataset
from .errors import LtcliError, check_seed
from .evaluate import compute_metrics
from .io import atomic_torch_save, safe_torch_load
from .mixing import LOSSES, log_prior, mix_batch, training_loss
from .models import build_model
from .rundir import RUN_FORMAT, RunDir, dataset_id, file_sha256
from .sampling import LongTailSampler, strategy_q
from .transforms import augment_batch, normalize_batch, test_resize, test_transform, train_transform

SMALL_IMAGE_MAX = 64  # images up to this side are decoded once into memory


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    arch: str = "resnet8"
    weights: str | None = None
    sampling: str = "instance"
    sampling_q: float | None = None
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 5
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"  # auto = bf16 on CUDA, off on CPU
    channels_last: bool = True
    image_size: int | None = None  # None: native size for small images, 224 for large ones
    workers: int = 4
    many_threshold: int = 100
    few_threshold: int = 20
    compile: bool = False  # torch.compile; on CUDA "reduce-overhead" captures the step in CUDA graphs
    # regularisers against memorising train (ltcli.mixing); 0 = off
    mixup: float = 0.0  # Beta(α, α) of mixup
    cutmix: float = 0.0  # Beta(α, α) of cutmix
    mix_switch_prob: float = 0.5  # with both: probability of cutmix for a batch
    mixup_off_epochs: int = 0  # the last N epochs train without mixing (Bag of Tricks)
    label_smoothing: float = 0.0
    loss: str = "ce"  # ce | balanced-softmax

    def identity(self) -> dict[str, Any]:
        """The fields that define a run: --resume refuses a run whose identity differs."""
        d = asdict(self)
        for volatile in ("device", "workers", "epochs", "compile"):
            d.pop(volatile)
        d["data"].pop("skip_bad_images", None)
        return d


# --- device and distributed helpers --------------------------------------------------


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> DistInfo:
    """Join the process group when launched by torchrun (RANK/WORLD_SIZE set)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_name != "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    return DistInfo(rank, world, local_rank)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# --- learning-rate schedule ------------------------------------------------------------


def lr_at(step: int, steps_per_epoch: int, cfg: TrainConfig) -> float:
    """Linear warm-up over warmup_epochs, then cosine decay to 0."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = min(cfg.warmup_epochs * steps_per_epoch, total - 1)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return 0.5 * cfg.lr * (1.0 + math.cos(math.pi * progress))


# --- the data a run trains on --------------------------------------------------------------


def probe_native_size(split) -> int | None:
    """Side of the first readable image, so CIFAR-sized JPEG folders train at 32 px, not 224."""
    for i in range(min(len(split), 8)):
        try:
            with split.load(i) as im:
                return max(im.size)
        except LtcliError:
            continue
    return None


class TrainImages:
    """Gives batches of (images, labels) on the device for a list of sample indices."""

    def __init__(self, dataset: Dataset, cfg: TrainConfig, device: torch.device, dist_info: DistInfo):
        self.split = dataset.split("train")
        self.device = device
        native = dataset.native_size or probe_native_size(self.split)
        self.size = cfg.image_size or (native if native and native <= SMALL_IMAGE_MAX else 224)
        self.in_memory = self.size <= SMALL_IMAGE_MAX
        self.labels_np = np.asarray(self.split.labels, dtype=np.int64)
        self.kept = np.arange(len(self.split))
        self.skipped: list[str] = []
        if self.in_memory:
            images, kept = decode_split(
                self.split, self.size, skip_bad=cfg.data.skip_bad_images, workers=max(1, cfg.workers)
            )
            self.kept = np.asarray(kept, dtype=np.int64)
            self.skipped = dataset.restrict("train", self.kept)
            self.images = images.to(device)
            if cfg.channels_last and device.type == "cuda":
                self.images = self.images.contiguous(memory_format=torch.channels_last)
            self.labels_np = self.labels_np[self.kept]
            self.labels = torch.as_tensor(self.labels_np, device=device)

    def batch(self, index: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """index: sample positions, already on the device (a per-step host-to-device copy of
        the indices would make the CPU wait for the GPU every step)."""
        x = augment_batch(self.images.index_select(0, index), generator)
        return normalize_batch(x), self.labels.index_select(0, index)


def _file_loader(split, transform, indices, batch_size, workers, device, draft=None):
    """Batches (x, y, idx, bad_paths): unreadable images come back by name, never as a worker
    traceback, and the caller decides whether to fail or skip them."""
    return torch.utils.data.DataLoader(
        SplitDataset(split, transform, skip_bad=True, draft=draft),
        collate_fn=collate_skip,
        batch_size=batch_size,
        sampler=indices.tolist(),  # any iterable of indices serves as a sampler
        num_workers=workers,
        pin_memory=device.type == "cuda",
        drop_last=False,
        persistent_workers=False,
    )


# --- evaluation during training ------------------------------------------------------------


class HeldOutImages:
    """The per-epoch validation split, decoded once (small images) so epochs don't re-decode it."""

    def __init__(self, split, size, cfg, device):
        self.split, self.size, self.device = split, size, device
        self.skip_bad = cfg.data.skip_bad_images
        self.seen_labels: list[torch.Tensor] = []
        self.labels = torch.as_tensor(np.asarray(split.labels, dtype=np.int64))
        self.images = None
        if size <= SMALL_IMAGE_MAX:
            images, kept = decode_split(split, size, skip_bad=cfg.data.skip_bad_images, workers=max(1, cfg.workers))
            self.labels = self.labels[torch.as_tensor(kept)]
            self.images = images.to(device)

    def batches(self, batch_size, workers):
        if self.images is not None:
            for start in range(0, len(self.images), batch_size):
                yield normalize_batch(self.images[start : start + batch_size])
        else:
            loader = _file_loader(self.split, test_transform(self.size), np.arange(len(self.split)), batch_size,
                                  workers, self.device, draft=test_resize(self.size))
            for x, y, _, bad in loader:
                if bad and not self.skip_bad:
                    raise LtcliError(f"{bad[0]}: cannot read image (--skip-bad-images skips and records it)")
                if x is not None:
                    self.seen_labels.append(y)
                    yield x.to(self.device, non_blocking=True)


@torch.no_grad()
def evaluate_model(model, held_out: HeldOutImages, autocast_dtype, train_counts, cfg, batch_size=512, workers=4):
    """Top-1 and shot-group accuracy of the joint classifier on a held-out split."""
    model.eval()
    device = held_out.device
    outputs = []
    held_out.seen_labels = []
    for x in held_out.batches(batch_size, workers):
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            outputs.append(model(x).float().cpu())
    model.train()
    scores = torch.cat(outputs) if outputs else torch.zeros(0, len(train_counts))
    # streamed (large) images: the labels of the images actually read, skipped ones left out
    labels = torch.cat(held_out.seen_labels) if held_out.seen_labels else held_out.labels
    return compute_metrics(scores, labels, train_counts, many=cfg.many_threshold, few=cfg.few_threshold)


# --- checkpoints ---------------------------------------------------------------------------


def _plain_state(model) -> dict[str, torch.Tensor]:
    inner = model.module if hasattr(model, "module") else model
    return {k: v.detach().cpu().clone() for k, v in inner.state_dict().items()}


def checkpoint_payload(model, optimizer, epoch: int, cfg: TrainConfig, run_info: dict) -> dict:
    return {
        "format": RUN_FORMAT,
        "kind": "ltcli-backbone",
        "arch": cfg.arch,
        "num_classes": int(run_info["num_classes"]),
        "feature_dim": int(run_info["feature_dim"]),
        "epoch": epoch,
        "config": cfg.identity(),
        "dataset_id": run_info["dataset_id"],
        "model": _plain_state(model),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
    }


def load_backbone(path, expected_kind: str = "ltcli-backbone") -> dict:
    """Load a stage-1 checkpoint (weights_only) and check it is one."""
    ckpt = safe_torch_load(path, "checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("kind") != expected_kind or "model" not in ckpt:
        raise LtcliError(f"{path}: not an ltcli backbone checkpoint (no 'kind': '{expected_kind}')")
    for key in ("arch", "num_classes", "feature_dim"):
        if key not in ckpt:
            raise LtcliError(f"{path}: checkpoint lacks '{key}'")
    if not isinstance(ckpt["arch"], str) or not ckpt["arch"]:
        raise LtcliError(f"{path}: checkpoint 'arch' is not a name ({ckpt['arch']!r})")
    for key in ("num_classes", "feature_dim"):
        if isinstance(ckpt[key], bool) or not isinstance(ckpt[key], int) or ckpt[key] < 1:
            raise LtcliError(f"{path}: checkpoint '{key}' is not a positive integer ({ckpt[key]!r})")
    model = ckpt["model"]
    if not isinstance(model, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in model.items()):
        raise LtcliError(f"{path}: checkpoint 'model' is not a state dict of named tensors")
    return ckpt


def model_from_checkpoint(ckpt: dict, path) -> torch.nn.Module:
    try:
        model = build_model(ckpt["arch"], int(ckpt["num_classes"]))
    except LtcliError as exc:  # the culprit is the checkpoint, not an --arch the user typed
        raise LtcliError(f"{path}: cannot rebuild the checkpoint's network ({exc})") from None
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise LtcliError(f"{path}: weights do not fit arch {ckpt['arch']} ({first[:160]})") from None
    return model


# --- the training job ----------------------------------------------------------------------


def _identity_defaults() -> dict:
    defaults = TrainConfig().identity()
    return {k: v for k, v in defaults.items() if k not in ("data",)}


def _check_run_dir(run: RunDir, cfg: TrainConfig, resume: bool, overwrite: bool) -> dict | None:
    """Refuse to clobber another run; on --resume, insist on the same configuration."""
    if run.root.exists() and not run.root.is_dir():
        raise LtcliError(f"--run {run.root}: exists and is not a directory")
    if resume:
        if not run.last_checkpoint.exists():
            raise LtcliError(f"--resume: {run.last_checkpoint} not found (nothing to resume)")
        info = run.read()
        # runs made before a field existed recorded its default implicitly
        before = {**_identity_defaults(), **info.get("train_config", {})}
        now = cfg.identity()
        diffs = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        if diffs:
            key = diffs[0]
            raise LtcliError(
                f"--resume: {run.run_json} was made with a different configuration "
                f"({key}: {before.get(key)!r} there, {now.get(key)!r} now)"
            )
        return info
    if run.has_other_files() and not overwrite:
        raise LtcliError(
            f"--run {run.root}: already holds a run (run.json / checkpoints); "
            "pass --resume to continue it, --overwrite to replace it, or choose another --run"
        )
    return None


def _check_regularisers(cfg: TrainConfig) -> None:
    for flag, value in (("--mixup", cfg.mixup), ("--cutmix", cfg.cutmix)):
        if not (math.isfinite(value) and 0 <= value <= 100):
            raise LtcliError(f"{flag} {value}: the Beta parameter α must be in [0, 100] (0 = off; 1.0 is usual)")
    if not (math.isfinite(cfg.mix_switch_prob) and 0 <= cfg.mix_switch_prob <= 1):
        raise LtcliError(f"--mix-switch-prob {cfg.mix_switch_prob}: must be in [0, 1]")
    if cfg.mixup_off_epochs < 0:
        raise LtcliError(f"--mixup-off-epochs {cfg.mixup_off_epochs}: must be >= 0")
    if cfg.mixup_off_epochs and not (cfg.mixup or cfg.cutmix):
        raise LtcliError(f"--mixup-off-epochs {cfg.mixup_off_epochs}: needs --mixup or --cutmix")
    if cfg.mixup_off_epochs >= cfg.epochs and (cfg.mixup or cfg.cutmix):
        raise LtcliError(f"--mixup-off-epochs {cfg.mixup_off_epochs}: must be below --epochs {cfg.epochs} "
                         "(mixing would never be used)")
    if not (math.isfinite(cfg.label_smoothing) and 0 <= cfg.label_smoothing < 1):
        raise LtcliError(f"--label-smoothing {cfg.label_smoothing}: must be in [0, 1)")
    if cfg.loss not in LOSSES:
        raise LtcliError(f"--loss {cfg.loss}: choose {' or '.join(LOSSES)}")


def _replace_old_run(run: RunDir) -> None:
    """--overwrite: the old run's files go only once the new run is ready to start, so a
    new run that fails on its data or options leaves the old one intact."""
    for p in (run.backbone, run.last_checkpoint, run.metrics):
        p.unlink(missing_ok=True)


def train_backbone(cfg: TrainConfig, run: RunDir, *, resume: bool = False, overwrite: bool = False,
                   progress: bool = True) -> dict:
    """Train stage 1 and write run.json, backbone.pt, backbone-last.pt and metrics.jsonl."""
    if cfg.epochs < 1:
        raise LtcliError(f"--epochs {cfg.epochs}: must be at least 1")
    if cfg.batch_size < 1:
        raise LtcliError(f"--batch-size {cfg.batch_size}: must be at least 1")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise LtcliError(f"--lr {cfg.lr}: must be positive")
    if cfg.warmup_epochs < 0:
        raise LtcliError(f"--warmup-epochs {cfg.warmup_epochs}: must be >= 0")
    if not (math.isfinite(cfg.momentum) and 0 <= cfg.momentum < 1):
        raise LtcliError(f"--momentum {cfg.momentum}: must be in [0, 1)")
    if not (math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0):
        raise LtcliError(f"--weight-decay {cfg.weight_decay}: must be a finite number >= 0")
    if cfg.image_size is not None and cfg.image_size < 8:
        raise LtcliError(f"--image-size {cfg.image_size}: must be at least 8")
    if cfg.workers < 0:
        raise LtcliError(f"--workers {cfg.workers}: must be >= 0")
    check_seed(cfg.seed)
    _check_regularisers(cfg)
    strategy_q(cfg.sampling, cfg.sampling_q)  # validates --sampling early
    device = resolve_device(cfg.device)
    autocast_dtype = amp_dtype(cfg.amp, device)
    dist_info = init_distributed(cfg.device)
    if dist_info.enabled and device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)

    previous = None
    if dist_info.is_main:
        previous = _check_run_dir(run, cfg, resume, overwrite)
    if dist_info.enabled:
        dist.barrier()
    seed_everything(cfg.seed)

    dataset = load_dataset(cfg.data)
    model = build_model(cfg.arch, dataset.num_classes, weights=cfg.weights, seed=cfg.seed)
    train_counts = list(map(int, dataset.train_counts))
    info = {
        "format": RUN_FORMAT,
        "ltcli_version": __version__,
        "created_by": "train-backbone",
        "data": asdict(cfg.data),
        "arch": cfg.arch,
        "weights": cfg.weights,
        "num_classes": dataset.num_classes,
        "feature_dim": int(model.feature_dim),
        "class_names": list(dataset.class_names),
        "train_counts": train_counts,
        "splits": {name: len(s) for name, s in dataset.splits.items()},
        "fingerprints": {name: s.fingerprint() for name, s in dataset.splits.items()},
        "sampling": cfg.sampling,
        "sampling_q": strategy_q(cfg.sampling, cfg.sampling_q),  # progressive: the end point
        "seed": cfg.seed,
        "train_config": cfg.identity(),
        "skipped_images": list(dataset.skipped),
    }
    info["dataset_id"] = dataset_id(cfg.data.spec, info["class_names"], train_counts, info["fingerprints"]["train"])
    if previous is not None and previous.get("dataset_id") != info["dataset_id"]:
        raise LtcliError(f"--resume: the data behind {run.run_json} changed since the run started")

    images = TrainImages(dataset, cfg, device, dist_info)
    info["image_size"] = images.size  # what extract and predict must feed the backbone
    if images.skipped:
        info["skipped_images"] = sorted(set(info["skipped_images"]) | set(images.skipped))
    num_train = len(images.kept)
    sampler = LongTailSampler(
        images.labels_np, cfg.sampling, q=cfg.sampling_q, seed=cfg.seed,
        rank=dist_info.rank, world_size=dist_info.world_size, total_epochs=cfg.epochs,
    )
    prior = None
    if cfg.loss == "balanced-softmax":  # the counts of the images this run trains on
        counts = np.bincount(images.labels_np, minlength=dataset.num_classes)
        if (counts == 0).any():
            j = int(np.flatnonzero(counts == 0)[0])
            raise LtcliError(f"--loss balanced-softmax: class {j} ('{dataset.class_names[j]}') has no train "
                             "image, so its prior log(n_j / N) is undefined")
        prior = log_prior(counts, device)
    per_rank_batch = max(1, cfg.batch_size // dist_info.world_size)
    steps_per_epoch = max(1, math.ceil(len(sampler) / per_rank_batch))

    model = model.to(device)
    if cfg.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    # weight decay on every parameter, BN and biases included, as the LDAM and decoupling
    # reference code does: in a long-tailed run it is what keeps the head classes' weight
    # norms (and the classifier bias) from running away from the tail's
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay, nesterov=False)
    start_epoch = 0
    if resume:
        last = run.last_checkpoint
        ckpt = load_backbone(last)
        epoch = ckpt.get("epoch")
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise LtcliError(f"{last}: checkpoint 'epoch' is missing or not an epoch number ({epoch!r})")
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as exc:
            raise LtcliError(f"{last}: weights do not fit this run's {cfg.arch} "
                             f"({str(exc).strip().splitlines()[0][:160]})") from None
        try:
            optimizer.load_state_dict(ckpt.get("optimizer"))
        except (TypeError, ValueError, KeyError, AttributeError, RuntimeError) as exc:
            raise LtcliError(f"{last}: optimizer state missing or does not fit this run "
                             f"({str(exc).strip().splitlines()[0][:160] or type(exc).__name__})") from None
        start_epoch = epoch + 1
    train_model = model
    if dist_info.enabled:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.compile:
        # small nets at CIFAR batch sizes are launch-bound: CUDA graphs remove the launch cost
        train_model = torch.compile(train_model, mode="reduce-overhead" if device.type == "cuda" else "default")

    if dist_info.is_main:
        run.root.mkdir(parents=True, exist_ok=True)
        if not resume:
            if overwrite:
                _replace_old_run(run)
            run.write(info)
        run.log_event({"event": "train-start", "resume_from_epoch": start_epoch, "device": str(device),
                       "world_size": dist_info.world_size, "num_train": num_train})

    val_name = "val" if "val" in dataset.splits else ("test" if "test" in dataset.splits else None)
    held_out = None
    if val_name is not None and dist_info.is_main:
        held_out = HeldOutImages(dataset.split(val_name), images.size, cfg, device)
    history = []
    bar = progress_bar(disable=not (progress and dist_info.is_main))
    with bar:
        task = bar.add_task("train", total=(cfg.epochs - start_epoch) * steps_per_epoch, rate="")
        for epoch in range(start_epoch, cfg.epochs):
            metrics = _train_one_epoch(
                train_model, optimizer, images, sampler, epoch, cfg, per_rank_batch, steps_per_epoch,
                device, autocast_dtype, bar, task, dist_info, prior,
            )
            if not math.isfinite(metrics["train_loss"]):
                raise LtcliError(f"--lr {cfg.lr}: training diverged in epoch {epoch + 1} (the loss became NaN "
                                 "or inf); use a smaller --lr (the last good checkpoint is kept)")
            record = {"event": "epoch", "epoch": epoch + 1, "epochs": cfg.epochs, **metrics}
            if dist_info.is_main:
                # the per-epoch work outside the step loop, timed: with sub-second epochs (CIFAR
                # on a GPU) it is a visible share of the wall time
                t0 = time.perf_counter()
                if val_name is not None:
                    m = evaluate_model(model, held_out, autocast_dtype, train_counts, cfg, workers=cfg.workers)
                    record.update({f"{val_name}_{k}": m[k] for k in ("overall", "macro", "many", "medium", "few")})
                t1 = time.perf_counter()
                atomic_torch_save(checkpoint_payload(model, optimizer, epoch, cfg, info), run.last_checkpoint)
                record.update(eval_s=round(t1 - t0, 3), checkpoint_s=round(time.perf_counter() - t1, 3))
                run.log_event(record)
                history.append(record)
                _print_epoch(record, val_name)
            if dist_info.enabled:
                dist.barrier()

    if dist_info.is_main:
        if images.skipped:  # streamed images found unreadable during training
            info["skipped_images"] = sorted(set(info["skipped_images"]) | set(images.skipped))
            run.write(info)
        final = checkpoint_payload(model, None, cfg.epochs - 1, cfg, info)
        atomic_torch_save(final, run.backbone)
        run.log_event({"event": "train-done", "backbone_sha256": file_sha256(run.backbone)})
    if dist_info.enabled:
        dist.barrier()
        dist.destroy_process_group()
    return {"run": str(run.root), "backbone": str(run.backbone), "history": history}


def _train_one_epoch(model, optimizer, images, sampler, epoch, cfg, batch, steps, device, autocast_dtype,
                     bar, task, dist_info, prior=None):
    model.train()
    indices = np.array(sampler.rank_indices(epoch), dtype=np.int64)  # a writable copy of the stream
    # a generator per (seed, epoch, rank) makes augmentation repeatable and --resume exact
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.seed * 1_000_003 + epoch * 7919 + dist_info.rank)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    correct_mix = torch.zeros((), device=device)
    # mixing draws (λ, partners, boxes) from their own stream, seeded like the augmentation
    mix_rng = np.random.default_rng([cfg.seed, epoch, dist_info.rank, 1])
    mixing = {}
    if (cfg.mixup or cfg.cutmix) and epoch < cfg.epochs - cfg.mixup_off_epochs:
        mixing = dict(mixup=cfg.mixup, cutmix=cfg.cutmix, switch_prob=cfg.mix_switch_prob)
    seen = 0
    started = time.perf_counter()
    loader = None
    if images.in_memory:
        indices_on_device = torch.as_tensor(indices, device=device)  # one copy per epoch
    else:
        loader = iter(_file_loader(images.split, train_transform(images.size), indices, batch, cfg.workers, device))
    for step in range(steps):
        if images.in_memory:
            index = indices_on_device[step * batch : (step + 1) * batch]
            # a compiled step is specialised to one batch shape: drop the short last batch
            # rather than compile a second graph (the stream is reshuffled every epoch)
            if len(index) == 0 or (cfg.compile and len(index) < batch and step > 0):
                break
            x, y = images.batch(index, gen)
        else:
            try:
                x, y, _, bad = next(loader)
            except StopIteration:
                break
            if bad:
                if not cfg.data.skip_bad_images:
                    raise LtcliError(f"{bad[0]}: cannot read image (--skip-bad-images skips and records it)")
                images.skipped.extend(p for p in bad if p not in images.skipped)
            if x is None:
                continue
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            if cfg.channels_last and device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
        lr = lr_at(epoch * steps + step, steps, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        mixed = mix_batch(x, y, mix_rng, **mixing)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(mixed.x)
        loss = training_loss(logits, mixed, loss=cfg.loss, label_smoothing=cfg.label_smoothing, prior=prior)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        # accumulate on the device: no host sync inside the step loop
        loss_sum += loss.detach() * y.shape[0]
        pred = logits.detach().argmax(1)
        if mixed.lam == 1.0:
            correct += (pred == y).sum()
        else:  # a mixed pair counts as the share of its targets the prediction hits
            correct_mix += (pred == mixed.y_a).sum() * mixed.lam + (pred == mixed.y_b).sum() * (1.0 - mixed.lam)
        seen += int(y.shape[0])
        elapsed = time.perf_counter() - started
        bar.update(task, advance=1, rate=f"{seen * dist_info.world_size / max(elapsed, 1e-9):,.0f} img/s",
                   description=f"epoch {epoch + 1}/{cfg.epochs}")
        if _TEST_STEP_DELAY:
            _test_step_pause(epoch, step)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - started
    stats = torch.stack([loss_sum.float(), correct.float() + correct_mix, torch.tensor(float(seen), device=device)])
    if dist_info.enabled:
        dist.all_reduce(stats)
    total_seen = max(1.0, float(stats[2]))
    return {
        "train_loss": round(float(stats[0]) / total_seen, 5),
        "train_acc": round(float(stats[1]) / total_seen, 5),
        "samples": int(stats[2]),
        "lr_end": lr_at(epoch * steps + steps - 1, steps, cfg),
        "seconds": round(elapsed, 3),
        "images_per_s": round(total_seen / max(elapsed, 1e-9), 1),
    }


# Test hook (kill -9 tests): LTCLI_TEST_STEP_DELAY=SECONDS announces every finished step on stderr
# as `ltcli-test: epoch=E step=S` (0-based) and pauses after it. It changes no computation.
_TEST_STEP_DELAY = float(os.environ.get("LTCLI_TEST_STEP_DELAY", "0") or 0)


def _test_step_pause(epoch: int, step: int) -> None:
    import sys

    sys.stderr.write(f"ltcli-test: epoch={epoch} step={step}\n")
    sys.stderr.flush()
    time.sleep(_TEST_STEP_DELAY)


def _print_epoch(record: dict, val_name: str | None) -> None:
    msg = (f"epoch {record['epoch']}/{record['epochs']}  loss {record['train_loss']:.3f}  "
           f"train acc {100 * record['train_acc']:.1f}%  {record['images_per_s']:,.0f} img/s")
    if val_name is not None:
        def pct(k):
            v = record.get(f"{val_name}_{k}")
            return "  -  " if v is None else f"{100 * v:.1f}"
        msg += (f"  | {val_name} {pct('overall')}  many {pct('many')}  medium {pct('medium')}  "
                f"few {pct('few')}")
    err_console.print(msg, highlight=False)

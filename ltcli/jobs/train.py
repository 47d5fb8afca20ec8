"""`ltcli train-backbone`: stage 1, the backbone and its joint classifier.

Writes run.json (before training), config.toml (every option, resolved), backbone-last.pt
every epoch (atomic; model + optimizer + epoch, for --resume), backbone.pt at the end, and
metrics.jsonl. Under torchrun it trains with DDP (rank 0 writes; the sampler shards one
stream)."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..console import err_console, progress_bar
from ..data import DataConfig, load_dataset
from ..errors import JobFailed, LtcliError
from ..io import atomic_torch_save
from ..mixing import LOSSES, log_prior
from ..inputs import input_size, probe_native_size
from ..options import opt
from ..rundir import RunDir, file_sha256
from ..runtime import (AMP_HELP, DEVICE_HELP, amp_dtype, init_distributed, local_device, resolve_device,
                       seed_everything, shutdown_distributed)
from ..sampling import LongTailSampler, strategy_q
from ..trainer import TrainImages, epoch_line, evaluate_model, make_optimizer, train_one_epoch
from .common import DataOptions, dataset_run_info, environment, log_event

@dataclass(kw_only=True)
class TrainOptions(DataOptions):
    command = "train-backbone"

    arch: str = opt("resnet8", str, "resnet8/20/32/44/56/110 (CIFAR-size), resnet10, any torchvision.models "
                    "name, or timm:NAME (`ltcli archs`).")
    weights: str | None = opt(None, str, "torchvision weight name (e.g. IMAGENET1K_V1) or a local checkpoint "
                              "file to start from.", optional=True)
    sampling: str = opt("instance", str, "instance | class | sqrt | progressive.")
    sampling_q: float | None = opt(None, float, "General p_j ∝ n_j^q (overrides --sampling's q).", optional=True)
    epochs: int = opt(30, int, "Passes over the train split (CIFAR-LT recipe: 200; ImageNet-LT: 90).", min=1,
                      max=100_000)
    batch_size: int = opt(128, int, "Global batch (split across DDP ranks).", min=1, max=1 << 20)
    lr: float = opt(0.1, float, "Peak learning rate (linear warm-up, then cosine to 0).", positive=True)
    momentum: float = opt(0.9, float, "SGD momentum.", min=0.0, below=1.0)
    weight_decay: float = opt(5e-4, float, "L2 penalty on every parameter, BN and biases included, as in the "
                              "reference code (CIFAR-LT recipe: 2e-4).", min=0.0)
    warmup_epochs: int = opt(5, int, "Epochs of linear learning-rate warm-up.", min=0, max=100_000)
    device: str = opt("auto", str, DEVICE_HELP)
    amp: str = opt("auto", str, AMP_HELP)
    image_size: int | None = opt(None, int, "Training size (default: native for small images, 224 otherwise).",
                                 min=8, max=4096, optional=True)
    workers: int = opt(4, int, "Decode / loader worker processes.", min=0, max=256)
    compile: bool = opt(False, bool, "torch.compile the train step (CUDA graphs on GPU; pays off for small nets).")
    mixup: float = opt(0.0, float, "Mixup with λ ~ Beta(α, α) per batch (0 = off; MiSLAS: 1.0). Keeps the "
                       "backbone from memorising train, so cRT / LWS have something to learn.", min=0.0, max=100.0)
    cutmix: float = opt(0.0, float, "CutMix with λ ~ Beta(α, α) per batch (0 = off).", min=0.0, max=100.0)
    mix_switch_prob: float = opt(0.5, float, "With --mixup and --cutmix: probability that a batch uses cutmix.",
                                 min=0.0, max=1.0)
    mixup_off_epochs: int = opt(0, int, "Train the last N epochs without mixing (Bag of Tricks).", min=0)
    label_smoothing: float = opt(0.0, float, "Label smoothing ε of the stage-1 loss.", min=0.0, below=1.0)
    loss: str = opt("ce", str, "ce, or balanced-softmax (cross-entropy on logits + log prior: logit-adjusted "
                    "training, τ = 1).", choices=LOSSES)
    many: float = opt(100, float, "Many-shot (per-epoch val report): more than this many train images.", min=0.0)
    few: float = opt(20, float, "Few-shot (per-epoch val report): fewer than this many train images.", min=0.0)

    # options that may change between a run and its --resume (they do not change what is learnt
    # per epoch, or, for epochs, extend the same schedule)
    VOLATILE = ("device", "workers", "epochs", "compile", "skip_bad_images", "verify")

    def validate(self) -> None:
        strategy_q(self.sampling, self.sampling_q)  # validates --sampling early
        mixing = self.mixup or self.cutmix
        if self.mixup_off_epochs and not mixing:
            raise LtcliError(f"--mixup-off-epochs {self.mixup_off_epochs}: needs --mixup or --cutmix")
        if mixing and self.mixup_off_epochs >= self.epochs:
            raise LtcliError(f"--mixup-off-epochs {self.mixup_off_epochs}: must be below --epochs {self.epochs} "
                             "(mixing would never be used)")

    def identity(self) -> dict:
        """The options that define a run: --resume refuses a run whose identity differs."""
        return {k: v for k, v in self.to_dict().items() if k not in self.VOLATILE}


# --- the run directory ---------------------------------------------------------------------------


def check_run_dir(run: RunDir, opts: TrainOptions, resume: bool, overwrite: bool) -> dict | None:
    """Refuse to clobber another run; on --resume, insist on the same configuration."""
    if run.root.exists() and not run.root.is_dir():
        raise LtcliError(f"--run {run.root}: exists and is not a directory")
    if resume:
        # a run killed before its first checkpoint (run.json only) resumes from epoch 0
        if not run.last_checkpoint.exists() and (run.backbone.exists() or not run.run_json.exists()):
            raise LtcliError(f"--resume: {run.last_checkpoint} not found (nothing to resume)")
        info = run.read()
        before = info.get("train_config", {})
        now = opts.identity()
        diffs = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        if diffs:
            key = diffs[0]
            raise LtcliError(
                f"--resume: {run.run_json} was made with a different configuration "
                f"({key}: {before.get(key)!r} there, {now.get(key)!r} now)"
            )
        return info
    if run.has_checkpoint() and not overwrite:
        raise LtcliError(
            f"--run {run.root}: already holds a run (run.json / checkpoints); "
            "pass --resume to continue it, --overwrite to replace it, or choose another --run"
        )
    return None


def _run_info(opts: TrainOptions, dataset, model, data_cfg: DataConfig) -> dict:
    info = dataset_run_info("train-backbone", dataset, data_cfg, arch=opts.arch, feature_dim=model.feature_dim)
    info.update({
        "weights": opts.weights,
        "sampling": opts.sampling,
        "sampling_q": strategy_q(opts.sampling, opts.sampling_q),  # progressive: the end point
        "seed": opts.seed,
        "train_config": opts.identity(),
        "options": opts.to_dict(),
    })
    return info


def _balanced_prior(opts: TrainOptions, images, dataset, device):
    """log(n_j / N) of the images this run trains on, for --loss balanced-softmax."""
    if opts.loss != "balanced-softmax":
        return None
    counts = np.bincount(images.labels_np, minlength=dataset.num_classes)
    if (counts == 0).any():
        j = int(np.flatnonzero(counts == 0)[0])
        raise LtcliError(f"--loss balanced-softmax: class {j} ('{dataset.class_names[j]}') has no train "
                         "image, so its prior log(n_j / N) is undefined")
    return log_prior(counts, device)


def _resume_state(run: RunDir, model, optimizer, opts: TrainOptions) -> int:
    """Load backbone-last.pt into the model and optimizer; the epoch to start from."""
    from ..checkpoint import load_backbone, load_weights

    last = run.last_checkpoint
    if not last.exists():  # killed before its first checkpoint: nothing trained yet
        return 0
    ckpt = load_backbone(last)
    epoch = ckpt.get("epoch")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise LtcliError(f"{last}: checkpoint 'epoch' is missing or not an epoch number ({epoch!r})")
    load_weights(model, ckpt["model"], last, f"this run's {opts.arch}")
    try:
        optimizer.load_state_dict(ckpt.get("optimizer"))
    except (TypeError, ValueError, KeyError, AttributeError, RuntimeError) as exc:
        raise LtcliError(f"{last}: optimizer state missing or does not fit this run "
                         f"({str(exc).strip().splitlines()[0][:160] or type(exc).__name__})") from None
    if epoch + 1 >= opts.epochs:
        raise LtcliError(f"--resume: {last} already finished epoch {epoch + 1} of {opts.epochs}; nothing to train "
                         f"(pass a larger --epochs to train on)")
    return epoch + 1


@dataclass
class TrainResult:
    run: Path
    backbone: Path
    history: list


def run(opts: TrainOptions, run_dir: RunDir, *, resume: bool = False, overwrite: bool = False,
        progress: bool = True) -> TrainResult:
    """Train stage 1 into `run_dir`."""
    # imported here: torchvision costs every other command (and --help) a second
    from ..models import build_model, check_input_size

    device = resolve_device(opts.device)
    amp = amp_dtype(opts.amp, device)
    dist_info = init_distributed(opts.device)
    device = local_device(device, dist_info)
    previous = check_run_dir(run_dir, opts, resume, overwrite) if dist_info.is_main else None
    if dist_info.enabled:
        torch.distributed.barrier()
    seed_everything(opts.seed)

    data_cfg = opts.data_config()
    if previous is not None:  # fingerprint the data as the run did (--verify: bytes; else size and date)
        data_cfg = replace(data_cfg, verify=bool(previous.get("data", {}).get("verify")))
    dataset = load_dataset(data_cfg)
    for note in dataset.warnings[:5]:
        err_console.print(f"[yellow]note:[/yellow] {note}", highlight=False)
    if len(dataset.warnings) > 5:
        err_console.print(f"[yellow]note:[/yellow] and {len(dataset.warnings) - 5} more such classes", highlight=False)
    model = build_model(opts.arch, dataset.num_classes, weights=opts.weights, seed=opts.seed)
    check_input_size(model, input_size(dataset.native_size or probe_native_size(dataset.split("train")),
                                       opts.image_size)[0], opts.arch)
    info = _run_info(opts, dataset, model, data_cfg)
    if previous is not None and previous.get("dataset_id") != info["dataset_id"]:
        # without --verify a file's identity is its size and modification time, so a copied or
        # restored data folder reads as changed: say so, and how to start a run that survives it
        why = ("images added, removed or changed, compared by their bytes" if data_cfg.verify else
               "images added, removed, resized or re-dated; start runs with --verify to compare bytes, not dates")
        raise LtcliError(f"--resume: the data behind {run_dir.run_json} changed since the run started ({why})")
    images = TrainImages(dataset, opts, device)
    info["image_size"] = images.size  # what extract and predict must feed the backbone
    if images.skipped:
        info["skipped_images"] = sorted(set(info["skipped_images"]) | set(images.skipped))
    prior = _balanced_prior(opts, images, dataset, device)

    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, opts)
    start_epoch = _resume_state(run_dir, model, optimizer, opts) if resume else 0
    train_model = model
    if dist_info.enabled:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if opts.compile:
        # small nets at CIFAR batch sizes are launch-bound: CUDA graphs remove the launch cost
        train_model = torch.compile(train_model, mode="reduce-overhead" if device.type == "cuda" else "default")

    with contextlib.ExitStack() as held:
        if dist_info.is_main:
            # one process trains into a run: two runs started into one folder never mix files
            held.enter_context(run_dir.writing(wait=False, create=True))
            check_run_dir(run_dir, opts, resume, overwrite)  # again, now that no one else can write
            _start_run(run_dir, opts, info, resume, overwrite, device, dist_info, len(images.kept), start_epoch)
        loop = _EpochLoop(opts, dataset, images, device, amp, dist_info, info, run_dir)
        history = loop.run(train_model, model, optimizer, start_epoch, prior, progress)
        if dist_info.is_main:
            _finish_run(run_dir, model, opts, info, images)
    if dist_info.enabled:
        torch.distributed.barrier()
    shutdown_distributed(dist_info)
    return TrainResult(run_dir.root, run_dir.backbone, history)


def _start_run(run_dir, opts, info, resume, overwrite, device, dist_info, num_train, start_epoch) -> None:
    from ..config import write_config

    run_dir.root.mkdir(parents=True, exist_ok=True)
    if not resume:
        run_dir.clear_artifacts()  # --overwrite, or a run killed before its first checkpoint
        run_dir.write(info)
        write_config(run_dir.config, opts)
    log_event(run_dir, {"event": "train-start", "resume_from_epoch": start_epoch, "device": str(device),
                        "world_size": dist_info.world_size, "num_train": num_train, **environment(device)})


def _finish_run(run_dir, model, opts, info, images) -> None:
    if images.skipped:  # streamed images found unreadable during training
        info["skipped_images"] = sorted(set(info["skipped_images"]) | set(images.skipped))
        run_dir.write(info)
    final = _payload(model, None, opts.epochs - 1, opts, info)
    atomic_torch_save(final, run_dir.backbone)
    log_event(run_dir, {"event": "train-done", "backbone_sha256": file_sha256(run_dir.backbone)})


def _payload(model, optimizer, epoch, opts, info) -> dict:
    from ..checkpoint import checkpoint_payload

    return checkpoint_payload(model, optimizer, epoch, arch=opts.arch, num_classes=info["num_classes"],
                              feature_dim=info["feature_dim"], config=opts.identity(), dataset_id=info["dataset_id"])


class _EpochLoop:
    """The epochs of one run: train, val pass, checkpoint, log."""

    def __init__(self, opts, dataset, images, device, amp, dist_info, info, run_dir):
        self.opts, self.images, self.device, self.amp = opts, images, device, amp
        self.dist_info, self.info, self.run_dir = dist_info, info, run_dir
        self.sampler = LongTailSampler(images.labels_np, opts.sampling, q=opts.sampling_q, seed=opts.seed,
                                       rank=dist_info.rank, world_size=dist_info.world_size,
                                       total_epochs=opts.epochs)
        self.batch = max(1, opts.batch_size // dist_info.world_size)
        self.steps = max(1, math.ceil(len(self.sampler) / self.batch))
        self.val_name = "val" if "val" in dataset.splits else ("test" if "test" in dataset.splits else None)
        self.held_out = self.held_labels = None
        if self.val_name is not None and dist_info.is_main:
            from ..inputs import open_source

            split = dataset.split(self.val_name)
            self.held_out = open_source(split, size=images.size, in_memory=images.in_memory, device=device,
                                        workers=opts.workers, skip_bad=opts.skip_bad_images)
            self.held_labels = np.asarray(split.labels, dtype=np.int64)[self.held_out.kept]

    def run(self, train_model, model, optimizer, start_epoch, prior, progress) -> list:
        opts, history = self.opts, []
        bar = progress_bar(disable=not (progress and self.dist_info.is_main))
        with bar:
            task = bar.add_task("train", total=(opts.epochs - start_epoch) * self.steps, rate="")
            for epoch in range(start_epoch, opts.epochs):
                metrics = train_one_epoch(train_model, optimizer, self.images, self.sampler, epoch, opts,
                                          self.batch, self.steps, self.device, self.amp, bar, task,
                                          self.dist_info, prior)
                if not math.isfinite(metrics["train_loss"]):
                    raise JobFailed(f"--lr {opts.lr}: training diverged in epoch {epoch + 1} (the loss became NaN "
                                    "or inf); use a smaller --lr (the last good checkpoint is kept)")
                record = {"event": "epoch", "epoch": epoch + 1, "epochs": opts.epochs, **metrics}
                if self.dist_info.is_main:
                    self._after_epoch(model, optimizer, epoch, record)
                    history.append(record)
                if self.dist_info.enabled:
                    torch.distributed.barrier()
        return history

    def _after_epoch(self, model, optimizer, epoch, record) -> None:
        # the per-epoch work outside the step loop, timed: with sub-second epochs (CIFAR on a
        # GPU) it is a visible share of the wall time
        t0 = time.perf_counter()
        if self.held_out is not None:
            m = evaluate_model(model, self.held_out, self.held_labels, self.device, self.amp,
                               self.info["train_counts"], self.opts.many, self.opts.few)
            record.update({f"{self.val_name}_{k}": m[k] for k in ("overall", "macro", "many", "medium", "few")})
        t1 = time.perf_counter()
        atomic_torch_save(_payload(model, optimizer, epoch, self.opts, self.info), self.run_dir.last_checkpoint)
        record.update(eval_s=round(t1 - t0, 3), checkpoint_s=round(time.perf_counter() - t1, 3))
        log_event(self.run_dir, record)
        err_console.print(epoch_line(record, self.val_name), highlight=False)

"""Stage 1's training loop: the train images, one epoch, the per-epoch val pass.

Small images are decoded once into a uint8 tensor that lives on the training device, and
augmentation (and mixing) runs there too, so the GPU never waits for JPEG decoding. Large
images stream through a DataLoader with worker processes. The job around it (run directory,
run.json, checkpoints, resume) is `ltcli.jobs.train`."""

from __future__ import annotations

import math
import os
import time

import numpy as np
import torch

from .data import Dataset, SplitDataset, collate_skip, decode_split
from .errors import LtcliError
from .inputs import input_size, probe_native_size
from .metrics import compute_metrics
from .mixing import mix_batch, training_loss
from .runtime import autocast, to_channels_last
from .transforms import augment_batch, normalize_batch, train_transform


def lr_at(step: int, steps_per_epoch: int, epochs: int, warmup_epochs: int, lr: float) -> float:
    """Linear warm-up over warmup_epochs, then cosine decay to 0."""
    total = max(1, epochs * steps_per_epoch)
    warm = min(warmup_epochs * steps_per_epoch, total - 1)
    if step < warm:
        return lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return 0.5 * lr * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, opts) -> torch.optim.Optimizer:
    # weight decay on every parameter, BN and biases included, as the LDAM and decoupling
    # reference code does: in a long-tailed run it is what keeps the head classes' weight
    # norms (and the classifier bias) from running away from the tail's
    return torch.optim.SGD(model.parameters(), lr=opts.lr, momentum=opts.momentum,
                           weight_decay=opts.weight_decay, nesterov=False)


class TrainImages:
    """Gives batches of (images, labels) on the device for a list of sample indices."""

    def __init__(self, dataset: Dataset, opts, device: torch.device):
        self.split = dataset.split("train")
        self.device = device
        self.size, self.in_memory = input_size(dataset.native_size or probe_native_size(self.split),
                                               opts.image_size)
        self.labels_np = np.asarray(self.split.labels, dtype=np.int64)
        self.kept = np.arange(len(self.split))
        self.skipped: list[str] = []
        if self.in_memory:
            images, kept = decode_split(self.split, self.size, skip_bad=opts.skip_bad_images,
                                        workers=max(1, opts.workers))
            self.kept = np.asarray(kept, dtype=np.int64)
            self.skipped = dataset.restrict("train", self.kept)
            self.images = to_channels_last(images.to(device), device)
            self.labels_np = self.labels_np[self.kept]
            self.labels = torch.as_tensor(self.labels_np, device=device)

    def batch(self, index: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """index: sample positions, already on the device (a per-step host-to-device copy of
        the indices would make the CPU wait for the GPU every step)."""
        x = augment_batch(self.images.index_select(0, index), generator)
        return normalize_batch(x), self.labels.index_select(0, index)

    def stream(self, indices: np.ndarray, batch: int, workers: int):
        """Streamed images (large ones): batches (x, y, idx, bad_paths) from DataLoader workers;
        unreadable images come back by name, never as a worker traceback."""
        return iter(torch.utils.data.DataLoader(
            SplitDataset(self.split, train_transform(self.size), skip_bad=True), collate_fn=collate_skip,
            batch_size=batch, sampler=indices.tolist(), num_workers=workers,
            pin_memory=self.device.type == "cuda", drop_last=False, persistent_workers=False,
        ))


@torch.no_grad()
def evaluate_model(model, source, labels, device, amp, train_counts, many, few, batch_size=512) -> dict:
    """Top-1 and shot-group accuracy of the joint classifier on a held-out split (its images
    through `ltcli.inputs`, as extract and predict see them)."""
    model.eval()
    outputs = []
    for _, _, xs in source.batches(0, len(source.kept), batch_size):
        with autocast(device, amp):
            outputs.append(model(xs[0]).float().cpu())
    model.train()
    scores = torch.cat(outputs) if outputs else torch.zeros(0, len(train_counts))
    return compute_metrics(scores, labels, train_counts, many=many, few=few)


class EpochState:
    """What one epoch accumulates on the device (no host sync inside the step loop)."""

    def __init__(self, device):
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device)
        self.seen = 0

    def add(self, loss, logits, mixed, y) -> None:
        self.loss_sum += loss.detach() * y.shape[0]
        pred = logits.detach().argmax(1)
        if mixed.lam == 1.0:
            self.correct += (pred == y).sum()
        else:  # a mixed pair counts as the share of its targets the prediction hits
            self.correct += (pred == mixed.y_a).sum() * mixed.lam + (pred == mixed.y_b).sum() * (1.0 - mixed.lam)
        self.seen += int(y.shape[0])


def _batches(images: TrainImages, indices: np.ndarray, batch: int, steps: int, opts, gen, device):
    """(x, y) on the device for each step of the epoch."""
    if images.in_memory:
        on_device = torch.as_tensor(indices, device=device)  # one copy per epoch
        for step in range(steps):
            index = on_device[step * batch : (step + 1) * batch]
            # a compiled step is specialised to one batch shape: drop the short last batch
            # rather than compile a second graph (the stream is reshuffled every epoch)
            if len(index) == 0 or (opts.compile and len(index) < batch and step > 0):
                return
            yield images.batch(index, gen)
        return
    for x, y, _, bad in images.stream(indices, batch, opts.workers):
        if bad:
            if not opts.skip_bad_images:
                raise LtcliError(f"{bad[0]}: cannot read image (--skip-bad-images skips and records it)")
            images.skipped.extend(p for p in bad if p not in images.skipped)
        if x is not None:
            yield to_channels_last(x.to(device, non_blocking=True), device), y.to(device, non_blocking=True)


def train_one_epoch(model, optimizer, images, sampler, epoch, opts, batch, steps, device, amp, bar, task,
                    dist_info, prior=None) -> dict:
    model.train()
    indices = np.array(sampler.rank_indices(epoch), dtype=np.int64)  # a writable copy of the stream
    # a generator per (seed, epoch, rank) makes augmentation repeatable and --resume exact
    gen = torch.Generator(device=device)
    gen.manual_seed(opts.seed * 1_000_003 + epoch * 7919 + dist_info.rank)
    # mixing draws (λ, partners, boxes) from their own stream, seeded the same way
    mix_rng = np.random.default_rng([opts.seed, epoch, dist_info.rank, 1])
    mixing = {}
    if (opts.mixup or opts.cutmix) and epoch < opts.epochs - opts.mixup_off_epochs:
        mixing = dict(mixup=opts.mixup, cutmix=opts.cutmix, switch_prob=opts.mix_switch_prob)
    state = EpochState(device)
    started = time.perf_counter()
    for step, (x, y) in enumerate(_batches(images, indices, batch, steps, opts, gen, device)):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(epoch * steps + step, steps, opts.epochs, opts.warmup_epochs, opts.lr)
        mixed = mix_batch(x, y, mix_rng, **mixing)
        with autocast(device, amp):
            logits = model(mixed.x)
        loss = training_loss(logits, mixed, loss=opts.loss, label_smoothing=opts.label_smoothing, prior=prior)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        state.add(loss, logits, mixed, y)
        elapsed = time.perf_counter() - started
        bar.update(task, advance=1, rate=f"{state.seen * dist_info.world_size / max(elapsed, 1e-9):,.0f} img/s",
                   description=f"epoch {epoch + 1}/{opts.epochs}")
        if _TEST_STEP_DELAY:
            _test_step_pause(epoch, step)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - started
    stats = torch.stack([state.loss_sum.float(), state.correct.float(), torch.tensor(float(state.seen), device=device)])
    if dist_info.enabled:
        import torch.distributed as dist

        dist.all_reduce(stats)
    total_seen = max(1.0, float(stats[2]))
    return {
        "train_loss": round(float(stats[0]) / total_seen, 5),
        "train_acc": round(float(stats[1]) / total_seen, 5),
        "samples": int(stats[2]),
        "lr_end": lr_at(epoch * steps + steps - 1, steps, opts.epochs, opts.warmup_epochs, opts.lr),
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


def epoch_line(record: dict, val_name: str | None) -> str:
    msg = (f"epoch {record['epoch']}/{record['epochs']}  loss {record['train_loss']:.3f}  "
           f"train acc {100 * record['train_acc']:.1f}%  {record['images_per_s']:,.0f} img/s")
    if val_name is not None:
        def pct(k):
            v = record.get(f"{val_name}_{k}")
            return "  -  " if v is None else f"{100 * v:.1f}"
        msg += (f"  | {val_name} {pct('overall')}  many {pct('many')}  medium {pct('medium')}  "
                f"few {pct('few')}")
    return msg

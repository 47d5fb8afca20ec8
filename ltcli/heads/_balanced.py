"""Class-balanced SGD over frozen features, shared by `crt` and `lws`.

Everything is vectorised: the features stay in one (N·K) x D matrix on the device (in
their stored dtype, e.g. float16), each epoch's sample stream is drawn at once, and a
step is a gather, two matrix products and a few element-wise kernels. Gradients are
written out by hand (softmax cross-entropy), which avoids autograd's per-step overhead
and never needs the gradient with respect to the features."""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..errors import LtcliError
from ..featureset import FeatureSet
from .base import Opt, Progress, check_finite, source_name

DEFAULT_LR_PER_512 = 0.2  # official recipe: lr 0.2 at batch 512, scaled linearly with the batch


def training_options(weight_decay: float) -> dict[str, Opt]:
    return {
        "epochs": Opt(10, int, min=1, help="passes of N class-balanced samples"),
        "lr": Opt(None, float, min=0.0, optional=True, help="initial learning rate (default 0.2 * batch_size / 512)"),
        "batch_size": Opt(512, int, min=1, help="samples per SGD step"),
        "weight_decay": Opt(weight_decay, float, min=0.0, help="L2 penalty"),
        "momentum": Opt(0.9, float, min=0.0, help="SGD momentum"),
        "seed": Opt(0, int, min=0, help="seed of the initialisation and the sampling"),
    }


def effective_lr(options: dict) -> float:
    lr = options.get("lr")
    return DEFAULT_LR_PER_512 * options["batch_size"] / 512 if lr is None else float(lr)


class DeviceRows:
    """The train features as (N·K) x D rows on `device`; `batch(idx)` returns float32 rows.

    On the CPU the caller's tensor is used as is (no copy); on a GPU it is copied once,
    in chunks, keeping a 16-bit dtype when the features have one. NaN/inf are refused
    (checked where the rows live, so a GPU run does not scan them on the host)."""

    def __init__(self, features: torch.Tensor, device: torch.device, source: str) -> None:
        d = int(features.shape[-1])
        flat = features.reshape(-1, d)
        if flat.device == device:
            check_finite(features, source)
            self.rows = flat
            return
        dtype = flat.dtype if flat.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
        self.rows = torch.empty(flat.shape, dtype=dtype, device=device)
        finite = torch.ones((), dtype=torch.bool, device=device)
        step = max(1, (1 << 26) // max(1, d))
        for s in range(0, flat.shape[0], step):
            chunk = self.rows[s : s + step]
            chunk.copy_(flat[s : s + step])
            finite &= torch.isfinite(chunk).all()
        if not bool(finite):  # one sync; find the row on the original for the message
            check_finite(features, source)
            raise LtcliError(f"{source}: features contain NaN or inf")

    def batch(self, idx: torch.Tensor) -> torch.Tensor:
        return self.rows.index_select(0, idx).to(torch.float32)


class BalancedStream:
    """Per epoch, N draws: a class uniformly (among classes with samples), then a sample
    uniformly within it, then one of its K stored views uniformly."""

    def __init__(self, labels: torch.Tensor, num_classes: int, views: int, gen: torch.Generator) -> None:
        labels = labels.to("cpu", torch.int64)
        self.n, self.views, self.gen = int(labels.numel()), views, gen
        counts = torch.bincount(labels, minlength=num_classes)
        self.present = counts.nonzero().flatten()  # empty classes are never drawn
        self.counts = counts
        self.starts = torch.cumsum(counts, 0) - counts
        self.order = torch.argsort(labels, stable=True)  # sample ids grouped by class
        self.labels = labels

    def epoch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(row ids into the (N·K) x D matrix, their labels), both int64 of length N."""
        g, m = self.gen, self.n
        cls = self.present[torch.randint(len(self.present), (m,), generator=g)]
        cnt = self.counts[cls]
        off = (torch.rand(m, generator=g, dtype=torch.float64) * cnt).long().clamp_max_(cnt - 1)
        sample = self.order[self.starts[cls] + off]
        rows = sample * self.views
        if self.views > 1:
            rows += torch.randint(self.views, (m,), generator=g)
        return rows, cls


UpdateFn = Callable[[torch.Tensor, torch.Tensor, float], None]


def train_balanced(train: FeatureSet, update: UpdateFn, options: dict, device: torch.device,
                   progress: Progress | None, gen: torch.Generator) -> None:
    """Class-balanced passes over the features with a per-step cosine learning rate (to 0).

    update(x, y, lr) performs one SGD step on the caller's parameters for a float32 batch."""
    rows = DeviceRows(train.features, device, source_name(train))
    stream = BalancedStream(train.labels, train.num_classes, train.views, gen)
    epochs, bs, lr0 = options["epochs"], options["batch_size"], effective_lr(options)
    total = epochs * math.ceil(stream.n / bs)
    step = 0
    for epoch in range(epochs):
        ids, labels = stream.epoch()
        ids, labels = ids.to(device), labels.to(device)
        for s in range(0, stream.n, bs):
            update(rows.batch(ids[s : s + bs]), labels[s : s + bs],
                   0.5 * lr0 * (1.0 + math.cos(math.pi * step / total)))
            step += 1
        if progress is not None:
            progress(epoch + 1, epochs)


def sgd_momentum_step(params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor],
                      lr: float, weight_decay: float, momentum: float) -> None:
    """torch.optim.SGD semantics (dampening 0): g += wd*p; buf = m*buf + g; p -= lr*buf."""
    if weight_decay:
        torch._foreach_add_(grads, params, alpha=weight_decay)
    torch._foreach_mul_(bufs, momentum)
    torch._foreach_add_(bufs, grads)
    torch._foreach_add_(params, bufs, alpha=-lr)


_MINUS_ONES: dict[tuple[int, str], torch.Tensor] = {}


def softmax_minus_onehot(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample d(cross-entropy)/dz = softmax(z) - onehot(y), built in the softmax's buffer."""
    p = torch.softmax(z, dim=1)
    key = (p.shape[0], str(p.device))
    if key not in _MINUS_ONES:  # cached: one fewer kernel per step
        _MINUS_ONES[key] = torch.full((p.shape[0], 1), -1.0, device=p.device)
    return p.scatter_add_(1, y.unsqueeze(1), _MINUS_ONES[key])

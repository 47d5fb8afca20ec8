"""Class-balanced SGD over frozen features, shared by `crt` and `lws`.

Everything is vectorised: the features stay in one (N·K) x D matrix on the device (in
their stored dtype, e.g. float16), each epoch's sample stream is drawn at once, and a
step is a gather, two matrix products and a few element-wise kernels. Gradients are
written out by hand (softmax cross-entropy), which avoids autograd's per-step overhead
and never needs the gradient with respect to the features."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from ..errors import LtcliError
from ..featureset import FeatureSet
from ..options import Opt, seed_opt
from .base import Progress, check_finite, source_name

DEFAULT_LR_PER_512 = 0.2  # official recipe: lr 0.2 at batch 512, scaled linearly with the batch


def training_options(weight_decay: float) -> dict[str, Opt]:
    return {
        "epochs": Opt(10, int, "passes of N class-balanced samples", min=1, max=100_000),
        "lr": Opt(None, float, "initial learning rate (default 0.2 * batch_size / 512), cosine to 0",
                  positive=True, optional=True),
        "batch_size": Opt(512, int, "samples per SGD step", min=1, max=1 << 20),
        "weight_decay": Opt(weight_decay, float, "L2 penalty", min=0.0),
        "momentum": Opt(0.9, float, "SGD momentum", min=0.0, below=1.0),
        "seed": seed_opt("seed of the initialisation and the sampling"),
        "sampling": Opt("class", str, "class: class-balanced (the paper's); instance: every sample once per epoch "
                        "(a linear probe)", choices=("class", "instance")),
        "label_smoothing": Opt(0.0, float, "label smoothing ε of the loss (one ε for every class)", min=0.0,
                               below=1.0),
        "las_eps_head": Opt(None, float, "label-aware smoothing (MiSLAS): ε of the largest class; with "
                            "--las-eps-tail, ε per class from its train count", min=0.0, below=1.0, optional=True),
        "las_eps_tail": Opt(None, float, "label-aware smoothing: ε of the smallest class", min=0.0, below=1.0,
                            optional=True),
    }


def smoothing_per_class(options: dict, train_counts, device: torch.device) -> torch.Tensor | None:
    """ε per class, or None for plain cross-entropy. Label-aware smoothing (Zhong et al. 2021,
    MiSLAS's default 'concave' shape): ε_j = ε_tail + (ε_head − ε_tail) · sin(π/2 · (n_j − n_min) /
    (n_max − n_min)), so the head classes, which the network is over-confident on, are smoothed
    most. Otherwise --label-smoothing for every class."""
    head, tail = options.get("las_eps_head"), options.get("las_eps_tail")
    if (head is None) != (tail is None):
        raise LtcliError("--las-eps-head / --las-eps-tail: give both (the ε of the largest and the smallest class)")
    counts = torch.as_tensor(train_counts, dtype=torch.float64)
    if head is not None:
        if options.get("label_smoothing"):
            raise LtcliError("--label-smoothing: not with --las-eps-head / --las-eps-tail (they set ε per class)")
        span = float(counts.max() - counts.min())
        frac = (counts - counts.min()) / span if span > 0 else torch.ones_like(counts)
        eps = tail + (head - tail) * torch.sin(0.5 * math.pi * frac)
    elif options.get("label_smoothing"):
        eps = torch.full_like(counts, float(options["label_smoothing"]))
    else:
        return None
    return eps.to(device, torch.float32)


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
    uniformly within it, then one of its K stored views uniformly.

    Drawn with NumPy on the CPU: single-threaded vector ops are fastest for ~1e5 draws,
    and the stream is the same whichever device trains on it."""

    def __init__(self, labels: torch.Tensor, num_classes: int, views: int, rng: np.random.Generator,
                 balanced: bool = True) -> None:
        labels = labels.to("cpu", torch.int64).numpy()
        self.n, self.views, self.rng, self.balanced = int(labels.size), views, rng, balanced
        self.labels = labels
        self.counts = np.bincount(labels, minlength=num_classes)
        self.present = np.flatnonzero(self.counts)  # empty classes are never drawn
        self.starts = np.cumsum(self.counts) - self.counts
        self.order = np.argsort(labels, kind="stable")  # sample ids grouped by class

    def epoch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(row ids into the (N·K) x D matrix, their labels), both int64 of length N."""
        m, rng = self.n, self.rng
        if not self.balanced:  # instance sampling: every sample once per epoch, shuffled
            ids = rng.permutation(m)
            rows = ids * self.views + (rng.integers(self.views, size=m) if self.views > 1 else 0)
            return torch.from_numpy(rows.astype(np.int64)), torch.from_numpy(self.labels[ids])
        cls = self.present[rng.integers(len(self.present), size=m)]
        cnt = self.counts[cls]
        off = np.minimum((rng.random(m) * cnt).astype(np.int64), cnt - 1)
        rows = self.order[self.starts[cls] + off] * self.views
        if self.views > 1:
            rows += rng.integers(self.views, size=m)
        return torch.from_numpy(rows), torch.from_numpy(cls)


# step(x, y, neg_lr): one SGD step on a float32 batch; neg_lr is a 1-element device tensor
# holding -lr, so that the same step can be replayed from a CUDA graph.
StepFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]

_GRAPH_WARMUP = 3  # eager steps before capturing (cuBLAS handles, allocator)
# None: graph the steps on CUDA devices. True: also take the counter-driven path on the CPU
# (run eagerly there; lets tests check it against the plain loop). False: never.
USE_GRAPHS: bool | None = None


class _GraphedSteps:
    """Replays the full-batch steps of an epoch from one captured CUDA graph.

    A step is ~10 small kernels; launched one by one from Python they cost more than the
    two matrix products on a fast GPU. The graph reads its batch ids, labels and learning
    rate from device buffers through device-side counters, so one replay is one step."""

    def __init__(self, rows: DeviceRows, step: StepFn, neg_lr: torch.Tensor, full: int, bs: int) -> None:
        dev = neg_lr.device
        self.rows, self.step, self.neg_lr = rows, step, neg_lr
        self.ids = torch.empty((full, bs), dtype=torch.int64, device=dev)
        self.labels = torch.empty((full, bs), dtype=torch.int64, device=dev)
        self.batch_no = torch.zeros(1, dtype=torch.int64, device=dev)  # within the epoch
        self.step_no = torch.zeros(1, dtype=torch.int64, device=dev)  # global, for the lr
        self.graph: torch.cuda.CUDAGraph | None = None
        self.eager_done = 0

    def load_epoch(self, ids: torch.Tensor, labels: torch.Tensor, first_step: int) -> None:
        full, bs = self.ids.shape
        self.ids.copy_(ids[: full * bs].view(full, bs))
        self.labels.copy_(labels[: full * bs].view(full, bs))
        self.batch_no.zero_()
        self.step_no.fill_(first_step)

    def _body(self) -> None:
        idx = self.ids.index_select(0, self.batch_no).view(-1)
        y = self.labels.index_select(0, self.batch_no).view(-1)
        self.step(self.rows.batch(idx), y, self.neg_lr.index_select(0, self.step_no))
        self.batch_no.add_(1)
        self.step_no.add_(1)

    def run(self) -> None:
        if self.neg_lr.device.type != "cuda":
            self._body()
            return
        if self.graph is not None:
            self.graph.replay()
            return
        if self.eager_done < _GRAPH_WARMUP:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._body()
            torch.cuda.current_stream().wait_stream(side)
            self.eager_done += 1
            return
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):  # records only; nothing runs until replay
            self._body()
        self.graph.replay()


def train_balanced(train: FeatureSet, step: StepFn, options: dict, device: torch.device,
                   progress: Progress | None) -> None:
    """Class-balanced passes over the features, lr following a per-step cosine (to 0);
    the sample stream is seeded by options['seed']."""
    rows = DeviceRows(train.features, device, source_name(train))
    rng = np.random.default_rng(options["seed"])
    stream = BalancedStream(train.labels, train.num_classes, train.views, rng,
                            balanced=options.get("sampling", "class") == "class")
    epochs, bs, lr0 = options["epochs"], options["batch_size"], effective_lr(options)
    full, rest = divmod(stream.n, bs)
    per_epoch = full + (rest > 0)
    total = epochs * per_epoch
    t = torch.arange(total, dtype=torch.float64)
    neg_lr = (-0.5 * lr0 * (1.0 + torch.cos(math.pi * t / total))).to(device, torch.float32)
    use = device.type == "cuda" if USE_GRAPHS is None else USE_GRAPHS
    graphed = _GraphedSteps(rows, step, neg_lr, full, bs) if use and full > _GRAPH_WARMUP else None
    done = 0
    for epoch in range(epochs):
        ids, labels = stream.epoch()
        ids, labels = ids.to(device), labels.to(device)
        if graphed is not None:
            graphed.load_epoch(ids, labels, done)
        report = max(1, per_epoch // 50)  # within an epoch too, when it has many steps
        for j in range(per_epoch):
            if graphed is not None and j < full:
                graphed.run()
            else:
                s = j * bs
                step(rows.batch(ids[s : s + bs]), labels[s : s + bs], neg_lr[done : done + 1])
            done += 1
            if progress is not None and per_epoch >= 200 and (j + 1) % report == 0 and j + 1 < per_epoch:
                progress(epoch + (j + 1) / per_epoch, epochs)
        if progress is not None:
            progress(epoch + 1, epochs)


def minus_ones(bs: int, device: torch.device) -> torch.Tensor:
    """The (bs, 1) constant that softmax_minus_onehot scatters; allocated once per fit."""
    return torch.full((bs, 1), -1.0, device=device)


def softmax_minus_onehot(z: torch.Tensor, y: torch.Tensor, neg_ones: torch.Tensor,
                         eps: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample d(cross-entropy)/dz = softmax(z) - target, built in the softmax's buffer. The
    target is onehot(y), or with smoothing ε_y (per class): (1 - ε_y)·onehot(y) + ε_y / C."""
    p = torch.softmax(z, dim=1)
    if eps is None:
        return p.scatter_add_(1, y.unsqueeze(1), neg_ones[: p.shape[0]])
    e = eps.index_select(0, y).unsqueeze(1)
    p.sub_(e / p.shape[1])
    return p.scatter_add_(1, y.unsqueeze(1), e - 1.0)

"""Stage-1 regularisers that keep the backbone from memorising the train split, and the losses
they train with.

- mixup (Zhang et al. 2018): x' = λ·x + (1 − λ)·x[π], λ ~ Beta(α, α), one λ per batch;
- cutmix (Yun et al. 2019): a box of x[π] pasted into x, λ = the area left of x;
- with both, each batch uses cutmix with probability `switch_prob`, else mixup.

π is a permutation of the batch, so every label appears once as the first and once as the
second target of a mixed pair: the sampler's class frequencies are kept exactly. The loss of
a mixed batch is λ·L(z, y) + (1 − λ)·L(z, y[π]).

Losses: cross-entropy with optional label smoothing, or balanced softmax (Ren et al. 2020):
cross-entropy on z + log(n_j / N), i.e. logit-adjusted training with τ = 1; the network's own
logits are then already balanced at test time.

Random numbers come from a NumPy generator seeded per (seed, epoch, rank), so a resumed run
draws exactly what an uninterrupted one did.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

LOSSES = ("ce", "balanced-softmax")


@dataclass(frozen=True)
class MixedBatch:
    x: torch.Tensor
    y_a: torch.Tensor
    y_b: torch.Tensor
    lam: float  # weight of y_a
    perm: torch.Tensor | None = None  # partner of each row (y_b = y_a[perm])
    kind: str = "none"  # none | mixup | cutmix


def cutmix_box(height: int, width: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of a box covering about 1 − λ of the image, centred at random
    and clipped to it."""
    cut = np.sqrt(1.0 - lam)
    h, w = int(height * cut), int(width * cut)
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    top, bottom = np.clip(cy - h // 2, 0, height), np.clip(cy + h // 2, 0, height)
    left, right = np.clip(cx - w // 2, 0, width), np.clip(cx + w // 2, 0, width)
    return int(top), int(bottom), int(left), int(right)


def mix_batch(x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator, *, mixup: float = 0.0,
              cutmix: float = 0.0, switch_prob: float = 0.5) -> MixedBatch:
    """Mix one batch (N x C x H x W, any device). Off (α = 0 for both): the batch as it is, λ = 1."""
    if mixup <= 0 and cutmix <= 0:
        return MixedBatch(x, y, y, 1.0)
    use_cutmix = cutmix > 0 and (mixup <= 0 or rng.random() < switch_prob)
    alpha = cutmix if use_cutmix else mixup
    lam = float(rng.beta(alpha, alpha))
    perm = torch.from_numpy(rng.permutation(x.shape[0])).to(x.device)
    partner = x.index_select(0, perm)
    if use_cutmix:
        top, bottom, left, right = cutmix_box(x.shape[-2], x.shape[-1], lam, rng)
        x = x.clone()
        x[..., top:bottom, left:right] = partner[..., top:bottom, left:right]
        lam = 1.0 - (bottom - top) * (right - left) / (x.shape[-2] * x.shape[-1])
    else:
        x = x * lam + partner * (1.0 - lam)
    return MixedBatch(x, y, y.index_select(0, perm), lam, perm, "cutmix" if use_cutmix else "mixup")


def log_prior(train_counts, device: torch.device | None = None) -> torch.Tensor:
    """log(n_j / N) per class, float32 (every class needs a train image)."""
    counts = torch.as_tensor(np.asarray(train_counts, dtype=np.float64))
    return (counts / counts.sum()).log().to(device=device, dtype=torch.float32)


def training_loss(logits: torch.Tensor, batch: MixedBatch, *, loss: str = "ce", label_smoothing: float = 0.0,
                  prior: torch.Tensor | None = None) -> torch.Tensor:
    """The stage-1 loss of a (possibly mixed) batch; balanced softmax adds the log prior first."""
    z = logits.float()
    if loss == "balanced-softmax":
        z = z + prior
    ce = F.cross_entropy(z, batch.y_a, label_smoothing=label_smoothing)
    if batch.lam == 1.0:
        return ce
    return ce * batch.lam + F.cross_entropy(z, batch.y_b, label_smoothing=label_smoothing) * (1.0 - batch.lam)

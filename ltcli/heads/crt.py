"""`crt`: classifier re-training (Kang et al. 2020).

A freshly initialised linear classifier is trained on the frozen features with
class-balanced sampling (classes uniform, images uniform within a class), SGD with
momentum and a cosine learning rate; each sample uses a random stored view per epoch.
Defaults follow the official recipe: 10 epochs, batch 512, lr 0.2, weight decay 5e-4.
Options for a backbone trained not to memorise (MiSLAS): label-aware smoothing
(--las-eps-head / --las-eps-tail) and --init joint (start from the stage-1 classifier)."""

from __future__ import annotations

import math

import torch

from ..featureset import FeatureSet
from ..options import Opt
from ._balanced import minus_ones, smoothing_per_class, softmax_minus_onehot, train_balanced, training_options
from .linear import LinearHead
from .registry import register


@register
class CRTHead(LinearHead):
    method = "crt"
    order = 20
    summary = "classifier re-trained from scratch with class-balanced sampling"
    linear_form = True
    shows_weight_norms = True
    fast_options = {"epochs": 1}
    checks_values_on_device = True  # DeviceRows checks NaN/inf as it copies
    options_spec = {
        **training_options(weight_decay=5e-4),
        "init": Opt("random", str, "random: re-initialised (Kang et al.); joint: start from the stage-1 "
                    "classifier (MiSLAS's stage 2)", choices=("random", "joint")),
    }

    def _fit(self, train: FeatureSet, device, progress) -> None:
        c, d = self.num_classes, self.dim
        if self.options["init"] == "joint":
            self._check_classifier(train)
            w = train.weight.detach().to(device, torch.float32).clone()
            b = (train.bias if train.bias is not None else torch.zeros(c)).detach().to(device, torch.float32).clone()
        else:
            gen = torch.Generator().manual_seed(self.options["seed"])
            # nn.Linear's default initialisation, drawn from our own generator
            bound = 1.0 / math.sqrt(d)
            w = (torch.rand((c, d), generator=gen) * 2 - 1).mul_(bound).to(device)
            b = (torch.rand((c,), generator=gen) * 2 - 1).mul_(bound).to(device)

        wd, mom, bs = self.options["weight_decay"], self.options["momentum"], self.options["batch_size"]
        buf_w, buf_b = torch.zeros_like(w), torch.zeros_like(b)
        bs = min(bs, len(train.labels))  # a batch never holds more rows than there are
        neg_ones, ones = minus_ones(bs, device), torch.ones(bs, device=device)
        eps = smoothing_per_class(self.options, train.train_counts, device)

        def step(x: torch.Tensor, y: torch.Tensor, neg_lr: torch.Tensor) -> None:
            # torch.optim.SGD's momentum step (buf = m*buf + grad + wd*p; p -= lr*buf), fused
            # so that W (C x D, the only large tensor) is touched few times: the matrix
            # product itself scales the old buffer and accumulates the gradient gᵀx/B into it.
            g = softmax_minus_onehot(torch.addmm(b, x, w.t()), y, neg_ones, eps)
            inv = 1.0 / x.shape[0]
            buf_w.addmm_(g.t(), x, beta=mom, alpha=inv)
            buf_b.addmv_(g.t(), ones[: x.shape[0]], beta=mom, alpha=inv)  # bias grad: column sums
            if wd:
                torch._foreach_add_([buf_w, buf_b], [w, b], alpha=wd)
            w.addcmul_(buf_w, neg_lr)
            b.addcmul_(buf_b, neg_lr)

        train_balanced(train, step, self.options, device, progress)
        self.weight, self.bias = w.to("cpu"), b.to("cpu")
        self._reset_cache()

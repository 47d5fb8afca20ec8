"""`lws`: learnable weight scaling (Kang et al. 2020).

The stage-1 classifier stays frozen and only a per-class scale s_j (init 1) is learned
with class-balanced sampling: z'_j = s_j · (w_jᵀf + b_j), i.e. the whole logit is scaled,
bias included, as in the official code. Same training options as `crt`, except that
weight decay defaults to 0 (it would pull the scales towards 0, not towards 1)."""

from __future__ import annotations

import torch

from ..featureset import FeatureSet
from ._balanced import minus_ones, smoothing_per_class, softmax_minus_onehot, train_balanced, training_options
from .linear import LinearHead
from .registry import register


@register
class LWSHead(LinearHead):
    method = "lws"
    order = 40
    summary = "learnable per-class scale of the joint classifier, class-balanced"
    linear_form = True
    shows_weight_norms = True
    fast_options = {"epochs": 1}
    checks_values_on_device = True  # DeviceRows checks NaN/inf as it copies
    options_spec = training_options(weight_decay=0.0)
    needs_classifier = True
    extra_state = ("scales",)

    def _fit(self, train: FeatureSet, device, progress) -> None:
        c = self.num_classes
        self.weight = train.weight.detach().to("cpu", torch.float32).clone()
        self.bias = None if train.bias is None else train.bias.detach().to("cpu", torch.float32).clone()
        wt = self.weight.to(device).t().contiguous()
        b0 = (self.bias if self.bias is not None else torch.zeros(c)).to(device)
        s = torch.ones(c, device=device)

        buf = torch.zeros_like(s)
        wd, mom, bs = self.options["weight_decay"], self.options["momentum"], self.options["batch_size"]
        bs = min(bs, len(train.labels))  # a batch never holds more rows than there are
        neg_ones, ones = minus_ones(bs, device), torch.ones(bs, device=device)
        eps = smoothing_per_class(self.options, train.train_counts, device)

        def step(x: torch.Tensor, y: torch.Tensor, neg_lr: torch.Tensor) -> None:
            # SGD with momentum on s; dL/ds_j = mean_i g_ij z0_ij (z0: the frozen joint logits)
            z0 = torch.addmm(b0, x, wt)
            g = softmax_minus_onehot(z0 * s, y, neg_ones, eps).mul_(z0)
            buf.addmv_(g.t(), ones[: x.shape[0]], beta=mom, alpha=1.0 / x.shape[0])
            if wd:
                buf.add_(s, alpha=wd)
            s.addcmul_(buf, neg_lr)

        train_balanced(train, step, self.options, device, progress)
        self.scales = s.to("cpu")
        self._reset_cache()

    def _effective(self):
        w = self.weight * self.scales.unsqueeze(1)
        return w, None if self.bias is None else self.bias * self.scales

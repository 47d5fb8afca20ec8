"""`logit-adjust`: post-hoc logit adjustment z_j − τ·log(n_j / N) (Menon et al. 2021).

n_j are the run's train counts (FeatureSet.train_counts), N their sum. It is the stage-1
classifier with its bias shifted, so it stays a linear head."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import LtcliError
from ..featureset import FeatureSet
from ..options import Opt
from .base import missing_classes_message, source_name
from .linear import LinearHead
from .registry import register


@register
class LogitAdjustHead(LinearHead):
    method = "logit-adjust"
    order = 50
    summary = "joint logits − τ·log prior (Menon et al.), τ chosen on val by tune-tau"
    tunable = True
    linear_form = True
    options_spec = {"tau": Opt(1.0, float, min=0.0, help="strength τ of the prior correction")}
    needs_classifier = True
    extra_state = ("log_prior",)

    def _fit(self, train: FeatureSet, device, progress) -> None:
        counts = train.train_counts.to(torch.float64)
        missing = [int(j) for j in (counts <= 0).nonzero().flatten()]
        if missing:
            raise LtcliError(missing_classes_message(
                source_name(train), missing, train.class_names,
                "logit-adjust needs log(n_j / N) for every class"))
        self._copy_stage1(train)
        self.log_prior = (counts / counts.sum()).log().to(torch.float32)
        self._reset_cache()

    @classmethod
    def sweep_terms(cls, weight, bias, train_counts, taus, options):
        """For tune-tau: (T x C shifts −τ·log(n_j / N), the joint bias, additive=True)."""
        counts = torch.as_tensor(np.asarray(train_counts), dtype=torch.float64).reshape(-1)
        if (counts <= 0).any():
            j = int((counts <= 0).nonzero()[0])
            raise LtcliError(f"train counts: class {j} has no training samples; logit-adjust needs log(n_j) finite")
        t = torch.as_tensor([float(x) for x in taus], dtype=torch.float64)[:, None]
        return -t * (counts / counts.sum()).log()[None, :], bias, True

    def _effective(self):
        bias = self.bias if self.bias is not None else torch.zeros(self.num_classes)
        return self.weight, bias - self.options["tau"] * self.log_prior

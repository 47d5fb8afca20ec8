"""`logit-adjust`: post-hoc logit adjustment z_j − τ·log(n_j / N) (Menon et al. 2021).

n_j are the run's train counts (FeatureSet.train_counts), N their sum. It is the stage-1
classifier with its bias shifted, so it stays a linear head."""

from __future__ import annotations

import torch

from ..errors import LtcliError
from ..featureset import FeatureSet
from .base import Opt, missing_classes_message, source_name
from .linear import LinearHead


class LogitAdjustHead(LinearHead):
    method = "logit-adjust"
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

    def _effective(self):
        bias = self.bias if self.bias is not None else torch.zeros(self.num_classes)
        return self.weight, bias - self.options["tau"] * self.log_prior

"""`tau-norm`: rescale the stage-1 classifier, w̃_j = w_j / ‖w_j‖^τ (Kang et al. 2020).

The bias is dropped unless keep_bias=True (the paper drops it). The raw weights are
stored, so the same head file can be re-scored for another τ."""

from __future__ import annotations

import torch

from ..featureset import FeatureSet
from .base import Opt
from .linear import LinearHead


def tau_normalise(weight: torch.Tensor, tau: float) -> torch.Tensor:
    """w_j / ‖w_j‖^τ row-wise; an all-zero row stays zero instead of becoming NaN."""
    norms = weight.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return weight / norms.pow(tau)


class TauNormHead(LinearHead):
    method = "tau-norm"
    options_spec = {
        "tau": Opt(1.0, float, min=0.0, help="exponent τ of the weight-norm rescaling"),
        "keep_bias": Opt(False, bool, help="keep the stage-1 bias (dropped by default)"),
    }
    needs_classifier = True

    def _fit(self, train: FeatureSet, device, progress) -> None:
        self._copy_stage1(train)
        self._reset_cache()

    def _effective(self):
        w = tau_normalise(self.weight, self.options["tau"])
        return w, (self.bias if self.options["keep_bias"] else None)

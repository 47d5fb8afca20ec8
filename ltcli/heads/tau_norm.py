"""`tau-norm`: rescale the stage-1 classifier, w̃_j = w_j / ‖w_j‖^τ (Kang et al. 2020).

The bias is dropped unless keep_bias=True (the paper drops it). The raw weights are
stored, so the same head file can be re-scored for another τ."""

from __future__ import annotations

import torch

from ..featureset import FeatureSet
from ..options import Opt
from .linear import LinearHead
from .registry import register


def tau_normalise(weight: torch.Tensor, tau: float) -> torch.Tensor:
    """w_j / ‖w_j‖^τ row-wise; an all-zero row stays zero instead of becoming NaN."""
    norms = weight.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return weight / norms.pow(tau)


@register
class TauNormHead(LinearHead):
    method = "tau-norm"
    order = 30
    summary = "w_j / ‖w_j‖^τ, τ chosen on val by tune-tau"
    tunable = True
    linear_form = True
    shows_weight_norms = True
    options_spec = {
        "tau": Opt(1.0, float, min=0.0, help="exponent τ of the weight-norm rescaling"),
        "keep_bias": Opt(False, bool, help="keep the stage-1 bias (dropped by default)"),
    }
    needs_classifier = True

    def _fit(self, train: FeatureSet, device, progress) -> None:
        self._copy_stage1(train)
        self._reset_cache()

    @classmethod
    def sweep_terms(cls, weight, bias, train_counts, taus, options):
        """For tune-tau: (T x C column scales ‖w_j‖^-τ, the bias added unscaled or None, additive=False).
        A zero weight row has zero dot products whatever its scale; 1 keeps 0 * scale = 0."""
        t = torch.as_tensor([float(x) for x in taus], dtype=torch.float64)[:, None]
        norms = weight.detach().double().norm(dim=1)
        norms = torch.where(norms > 0, norms, torch.ones_like(norms))
        return torch.exp(-t * norms.log()[None, :]), (bias if options.get("keep_bias") else None), False

    def _effective(self):
        w = tau_normalise(self.weight, self.options["tau"])
        return w, (self.bias if self.options["keep_bias"] else None)

"""`joint`: the stage-1 classifier stored in the features file, as it is."""

from __future__ import annotations


from ..featureset import FeatureSet
from .linear import LinearHead
from .registry import register


@register
class JointHead(LinearHead):
    method = "joint"
    order = 0
    summary = "the stage-1 classifier as trained (the baseline)"
    options_spec = {}
    needs_classifier = True
    baseline = True
    linear_form = True
    shows_weight_norms = True

    def _fit(self, train: FeatureSet, device, progress) -> None:
        self._copy_stage1(train)
        self._reset_cache()

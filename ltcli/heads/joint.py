"""`joint`: the stage-1 classifier stored in the features file, as it is."""

from __future__ import annotations


from ..featureset import FeatureSet
from .linear import LinearHead


class JointHead(LinearHead):
    method = "joint"
    options_spec = {}
    needs_classifier = True

    def _fit(self, train: FeatureSet, device, progress) -> None:
        self._copy_stage1(train)
        self._reset_cache()

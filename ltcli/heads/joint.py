"""`joint`: the stage-1 classifier stored in the features file, as it is."""

from __future__ import annotations

import torch

from ..featureset import FeatureSet
from .base import get_tensor
from .linear import LinearHead


class JointHead(LinearHead):
    method = "joint"
    options_spec = {}
    needs_classifier = True

    def _fit(self, train: FeatureSet, device, progress) -> None:
        self.weight = train.weight.detach().to("cpu", torch.float32).clone()
        self.bias = None if train.bias is None else train.bias.detach().to("cpu", torch.float32).clone()
        self._reset_cache()

    def _effective(self):
        return self.weight, self.bias

    def _state(self) -> dict:
        return {"weight": self.weight, "bias": self.bias}

    def _load_state(self, state: dict) -> None:
        c, d = self.num_classes, self.dim
        self.weight = get_tensor(state, "weight", (c, d)).float()
        self.bias = get_tensor(state, "bias", (c,), optional=True)
        self.bias = None if self.bias is None else self.bias.float()
        self._reset_cache()

"""Shared scoring for heads that end in a linear classifier (scores = x Wᵀ + b)."""

from __future__ import annotations

import torch

from ..featureset import FeatureSet
from .base import Head, get_tensor


class LinearScores(torch.nn.Module):
    """x Wᵀ + b, as the head scores a chunk (an exportable module)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight_t", weight.detach().to(torch.float32).t().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight_t if self.bias is None else torch.addmm(self.bias, x, self.weight_t)


class LinearHead(Head):
    """A head that keeps a weight W (C x D), an optional bias b (C) and, per subclass, a few
    more per-class vectors (`extra_state`); `_effective()` gives the (W, b) it scores with."""

    extra_state: tuple[str, ...] = ()

    def _copy_stage1(self, train: FeatureSet) -> None:
        """Start from the stage-1 classifier stored in the features file."""
        self.weight = train.weight.detach().to("cpu", torch.float32).clone()
        self.bias = None if train.bias is None else train.bias.detach().to("cpu", torch.float32).clone()

    def _effective(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.weight, self.bias

    def _state(self) -> dict:
        return {"weight": self.weight, "bias": self.bias, **{k: getattr(self, k) for k in self.extra_state}}

    def _load_state(self, state: dict) -> None:
        c, d = self.num_classes, self.dim
        self.weight = get_tensor(state, "weight", (c, d)).float()
        bias = get_tensor(state, "bias", (c,), optional=True)
        self.bias = None if bias is None else bias.float()
        for key in self.extra_state:
            setattr(self, key, get_tensor(state, key, (c,)).float())
        self._reset_cache()

    def linear(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        self._require_fitted()
        return self._effective()

    def scoring_module(self) -> torch.nn.Module:
        w, b = self.linear()
        return LinearScores(w, b)

    def _reset_cache(self) -> None:
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def _logits_chunk(self, x: torch.Tensor, device: torch.device) -> torch.Tensor:
        cache = getattr(self, "_cache", None)
        if cache is None:
            self._reset_cache()
            cache = self._cache
        key = str(device)
        if key not in cache:  # move the (possibly derived) weights to the device once
            w, b = self._effective()
            cache[key] = (w.to(device, torch.float32).t().contiguous(),
                          None if b is None else b.to(device, torch.float32))
        wt, b = cache[key]
        return torch.addmm(b, x, wt) if b is not None else x @ wt

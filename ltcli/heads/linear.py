"""Shared scoring for heads that end in a linear classifier (scores = x Wᵀ + b)."""

from __future__ import annotations

import torch

from .base import Head


class LinearHead(Head):
    """Subclasses implement `_effective()`: the (W, b) that scores with, on the CPU."""

    def _effective(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def linear(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        self._require_fitted()
        return self._effective()

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

"""Shot groups: many / medium / few-shot classes by their TRAIN count (the official
`shot_acc`): many > 100, medium 20..100, few < 20 by default (`--many`, `--few`)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .errors import LtcliError

GROUP_NAMES = ("many", "medium", "few")


def _to_numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def check_thresholds(many: float, few: float) -> None:
    for flag, value in (("--many", many), ("--few", few)):
        if not (math.isfinite(value) and value >= 0):
            raise LtcliError(f"{flag} {value:g}: must be a finite number >= 0")
    if few > many:
        raise LtcliError(f"--few {few:g} / --many {many:g}: the few-shot threshold must not exceed the many-shot one")


def shot_groups(train_counts: Any, many: float = 100, few: float = 20) -> np.ndarray:
    """Group id per class: 0 many (n > many), 1 medium (few <= n <= many), 2 few (n < few)."""
    check_thresholds(many, few)
    counts = _to_numpy(train_counts).astype(np.int64).reshape(-1)
    groups = np.ones(counts.shape, dtype=np.int64)
    groups[counts > many] = 0
    groups[counts < few] = 2
    return groups

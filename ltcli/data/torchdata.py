"""A torch Dataset over a Split for large images, decoded per item in DataLoader workers."""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import LtcliError
from .types import Split


class SplitDataset(torch.utils.data.Dataset):
    """Item i = (transform(image), label, i); `draft` as in Split.load.

    With skip_bad=True an unreadable image yields (None, label, i, path) instead of
    raising; use `collate_skip` so the batch leaves it out and reports its path."""

    def __init__(self, split: Split, transform: Callable | None = None, skip_bad: bool = False,
                 draft: int | None = None) -> None:
        self.split, self.transform, self.skip_bad, self.draft = split, transform, skip_bad, draft

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        label = int(self.split.labels[i])
        try:
            img = self.split.load(i, draft=self.draft)
        except LtcliError:
            if not self.skip_bad:
                raise
            return None, label, i, self.split.paths[i]
        return (self.transform(img) if self.transform else img), label, i


def collate_skip(items):
    """Batch (x, y, index, bad) where bad lists the paths of the images left out
    (x is None when every image of the batch was bad)."""
    good = [it for it in items if it[0] is not None]
    bad = [it[3] for it in items if it[0] is None]
    if not good:
        return None, torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64), bad
    x = torch.stack([it[0] for it in good])
    y = torch.tensor([it[1] for it in good], dtype=torch.int64)
    idx = torch.tensor([it[2] for it in good], dtype=torch.int64)
    return x, y, idx, bad

"""The FeatureSet dataclass: what every classifier stage consumes.

Kept in its own tiny module (no h5py import) so the heads can depend on it;
`ltcli.features` re-exports it together with the HDF5 reader."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class FeatureSet:
    features: torch.Tensor  # float32, N x D  (or N x K x D when views > 1)
    labels: torch.Tensor  # int64, N
    weight: torch.Tensor | None  # stage-1 classifier C x D
    bias: torch.Tensor | None  # C
    class_names: list[str]
    train_counts: torch.Tensor  # int64, C (train counts of the run, for shot groups / logit-adjust)
    split: str
    attrs: dict = field(default_factory=dict)  # provenance: backbone_sha256, data_fingerprint, transform, views, path

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def dim(self) -> int:
        return int(self.features.shape[-1])

    @property
    def views(self) -> int:
        return 1 if self.features.dim() == 2 else int(self.features.shape[1])

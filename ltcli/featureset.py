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


def feature_set(features, labels, *, class_names=None, train_counts=None, weight=None, bias=None,
                split: str = "train") -> FeatureSet:
    """A FeatureSet from arrays (numpy or torch): features N x D (or N x K x D), labels N.

    class_names default to class_0 ...; train_counts to the label counts (pass the train
    split's counts when building a val or test set); weight / bias: a stage-1 classifier."""
    import numpy as np

    x = torch.as_tensor(np.asarray(features) if not isinstance(features, torch.Tensor) else features)
    y = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels).to(torch.int64)
    c = len(class_names) if class_names is not None else int(y.max()) + 1
    names = list(class_names) if class_names is not None else [f"class_{i}" for i in range(c)]
    counts = torch.as_tensor(train_counts if train_counts is not None else torch.bincount(y, minlength=c))
    w = None if weight is None else torch.as_tensor(weight, dtype=torch.float32)
    b = None if bias is None else torch.as_tensor(bias, dtype=torch.float32)
    return FeatureSet(x if x.is_floating_point() else x.float(), y, w, b, names, counts.to(torch.int64), split)


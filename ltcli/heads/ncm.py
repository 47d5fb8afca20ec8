"""`ncm`: nearest class mean (Kang et al. 2020), scored through FAISS.

Features (views averaged) are centred on the train mean and L2-normalised; each class
mean is the average of its normalised train features. cosine: the means are normalised
again and the score is the cosine similarity; euclidean: the score is minus the squared
distance to the (un-renormalised) mean. C is small, so every query is scored against all
C means with FAISS's brute-force pairwise routine (GPU when faiss has one): the same
numbers as a k = C nearest-mean search, into an N x C matrix; argmax = nearest mean."""

from __future__ import annotations

import numpy as np
import torch

from .. import faiss_index
from ..errors import LtcliError
from ..featureset import FeatureSet
from ..options import Opt
from .base import (Head, _CPU_CHUNK_ELEMS, check_finite, get_tensor, mean_views,
                   missing_classes_message, source_name)
from .registry import register


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _chunks(features: torch.Tensor, device: torch.device):
    """(start, float32 rows x D on device, views averaged) over the features, in chunks."""
    step = max(1, _CPU_CHUNK_ELEMS // max(1, features[0].numel()))
    for s in range(0, int(features.shape[0]), step):
        yield s, mean_views(features[s : s + step].to(device))


def train_mean(features: torch.Tensor, device: torch.device, source: str) -> torch.Tensor:
    """Mean feature (views averaged), accumulated in float64; refuses NaN/inf.

    The sum is finite exactly when every value is (bar an overflow, which check_finite
    then rules out): one check at the end replaces a scan of every chunk."""
    total = torch.zeros(int(features.shape[-1]), dtype=torch.float64, device=device)
    for _, x in _chunks(features, device):
        total += x.sum(0)  # float32 within a chunk (fast), float64 across chunks
    if not bool(torch.isfinite(total).all()):
        check_finite(features, source)  # names the first bad row, if there is one
        raise LtcliError(f"{source}: features too large (their sum overflows float32)")
    return (total / int(features.shape[0])).to(torch.float32)


class NCMScores(torch.nn.Module):
    """The NCM scores in plain torch (an exportable module): cosine similarity to the normalised
    class means, or minus the squared distance to them, of the centred, normalised feature."""

    def __init__(self, mean: torch.Tensor, class_means: torch.Tensor, metric: str):
        super().__init__()
        self.register_buffer("mean", mean.detach().to(torch.float32))
        self.register_buffer("means_t", class_means.detach().to(torch.float32).t().contiguous())
        self.register_buffer("sq_norms", class_means.detach().to(torch.float32).pow(2).sum(1))
        self.cosine = metric == "cosine"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = x - self.mean
        q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-12)
        dots = q @ self.means_t
        if self.cosine:
            return dots
        return 2 * dots - q.pow(2).sum(1, keepdim=True) - self.sq_norms


@register
class NCMHead(Head):
    method = "ncm"
    order = 10
    summary = "nearest class mean of the normalised features"
    options_spec = {"metric": Opt("cosine", str, choices=faiss_index.METRICS, help="cosine or euclidean")}
    checks_values_on_device = True  # train_mean checks NaN/inf in its pass

    def _fit(self, train: FeatureSet, device, progress) -> None:
        c, d = self.num_classes, self.dim
        labels = train.labels.to("cpu", torch.int64)
        counts = torch.bincount(labels, minlength=c)
        missing = [int(j) for j in (counts == 0).nonzero().flatten()]
        if missing:
            raise LtcliError(missing_classes_message(
                source_name(train), missing, train.class_names, "NCM needs at least one per class"))
        mean = train_mean(train.features, device, source_name(train))
        sums = torch.zeros((c, d), dtype=torch.float32, device=device)
        for s, x in _chunks(train.features, device):
            sums.index_add_(0, labels[s : s + x.shape[0]].to(device), _normalise(x - mean))
        means = sums / counts.to(device, torch.float32).unsqueeze(1)
        if self.options["metric"] == "cosine":
            means = _normalise(means)
        self.mean, self.class_means = mean.cpu(), means.cpu()
        self._means_np = None

    def _logits_chunk(self, x: torch.Tensor, device: torch.device) -> torch.Tensor:
        if getattr(self, "_means_np", None) is None:
            self._means_np = faiss_index.as_float32(self.class_means)
        q = _normalise(x - self.mean.to(x.device))
        scores = faiss_index.pairwise(q, self._means_np, self.options["metric"])
        if self.options["metric"] == "euclidean":
            np.negative(scores, out=scores)  # higher = better
        return torch.from_numpy(scores)

    def scoring_module(self) -> torch.nn.Module:
        return NCMScores(self.mean, self.class_means, self.options["metric"])

    def _state(self) -> dict:
        return {"mean": self.mean, "class_means": self.class_means}

    def _load_state(self, state: dict) -> None:
        self.mean = get_tensor(state, "mean", (self.dim,)).float()
        self.class_means = get_tensor(state, "class_means", (self.num_classes, self.dim)).float()
        self._means_np = None

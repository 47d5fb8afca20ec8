"""`ncm`: nearest class mean (Kang et al. 2020), searched with FAISS.

Features (views averaged) are centred on the train mean and L2-normalised; each class
mean is the average of its normalised train features. cosine: the means are normalised
again and the score is the cosine similarity; euclidean: the score is minus the squared
distance to the (un-renormalised) mean. C is small, so every query is searched against
all C means (k = C) and the scores are scattered into an N x C matrix."""

from __future__ import annotations

import numpy as np
import torch

from .. import faiss_index
from ..errors import LtcliError
from ..featureset import FeatureSet
from .base import Head, Opt, _CPU_CHUNK_ELEMS, get_tensor, mean_views, missing_classes_message, source_name


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def train_mean(features: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Mean feature (views averaged) in float64, accumulated chunk by chunk."""
    n, step = int(features.shape[0]), max(1, _CPU_CHUNK_ELEMS // features[0].numel())
    total = torch.zeros(int(features.shape[-1]), dtype=torch.float64, device=device)
    for s in range(0, n, step):
        total += mean_views(features[s : s + step].to(device)).sum(0, dtype=torch.float64)
    return (total / n).to(torch.float32)


class NCMHead(Head):
    method = "ncm"
    options_spec = {"metric": Opt("cosine", str, choices=faiss_index.METRICS, help="cosine or euclidean")}

    def _fit(self, train: FeatureSet, device, progress) -> None:
        c, d = self.num_classes, self.dim
        labels = train.labels.to("cpu", torch.int64)
        counts = torch.bincount(labels, minlength=c)
        missing = [int(j) for j in (counts == 0).nonzero().flatten()]
        if missing:
            raise LtcliError(missing_classes_message(
                source_name(train), missing, train.class_names, "NCM needs at least one per class"))
        feats = train.features
        self.mean = train_mean(feats, device)
        sums = torch.zeros((c, d), dtype=torch.float32, device=device)
        step = max(1, _CPU_CHUNK_ELEMS // feats[0].numel())
        for s in range(0, int(feats.shape[0]), step):
            x = _normalise(mean_views(feats[s : s + step].to(device)) - self.mean)
            sums.index_add_(0, labels[s : s + step].to(device), x)
        means = sums / counts.to(device, torch.float32).unsqueeze(1)
        if self.options["metric"] == "cosine":
            means = _normalise(means)
        self.mean, self.class_means = self.mean.cpu(), means.cpu()
        self._index = None

    def _get_index(self):
        if getattr(self, "_index", None) is None:
            index = faiss_index.make_index(self.dim, self.options["metric"], max_k=self.num_classes)
            faiss_index.add(index, self.class_means)
            self._index = index
        return self._index

    def _logits_chunk(self, x: torch.Tensor, device: torch.device) -> torch.Tensor:
        q = _normalise(x - self.mean.to(x.device))
        scores, ids = faiss_index.search(self._get_index(), q, self.num_classes)
        if self.options["metric"] == "euclidean":
            np.negative(scores, out=scores)  # higher = better
        out = torch.full((q.shape[0], self.num_classes), -float("inf"))
        out.scatter_(1, torch.from_numpy(ids), torch.from_numpy(scores))
        return out

    def _state(self) -> dict:
        return {"mean": self.mean, "class_means": self.class_means}

    def _load_state(self, state: dict) -> None:
        self.mean = get_tensor(state, "mean", (self.dim,)).float()
        self.class_means = get_tensor(state, "class_means", (self.num_classes, self.dim)).float()
        self._index = None

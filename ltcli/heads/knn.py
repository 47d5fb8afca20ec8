"""`knn`: k nearest training features through FAISS (beyond the paper).

Train features (views averaged) are kept in the head. metric='cosine' centres them on the
train mean and L2-normalises them (inner-product index); metric='euclidean' uses them as
they are (L2 index). A query's score for class j sums the votes of its k nearest train
samples of class j:
  weighting='distance' (default): each neighbour votes 1 / (1 + d), d its euclidean
      distance (for cosine the chordal distance sqrt(2 - 2 cos) between unit vectors);
  weighting='count': each neighbour votes 1 (ties go to the lower class index).
Classes with no neighbour among the k score 0."""

from __future__ import annotations

import numpy as np
import torch

from .. import faiss_index
from ..errors import LtcliError
from ..featureset import FeatureSet
from ..options import Opt
from .base import Head, _CPU_CHUNK_ELEMS, get_tensor, source_name
from .ncm import _chunks, _normalise, train_mean
from .registry import register


@register
class KNNHead(Head):
    method = "knn"
    order = 60
    summary = "k nearest training features, similarity-weighted votes"
    options_spec = {
        "k": Opt(10, int, "neighbours that vote", min=1, max=10_000),
        "metric": Opt("cosine", str, choices=faiss_index.METRICS, help="cosine or euclidean"),
        "weighting": Opt("distance", str, choices=("distance", "count"), help="vote 1/(1+d) or 1 per neighbour"),
    }
    checks_values_on_device = True  # train_mean checks NaN/inf in its pass

    def _fit(self, train: FeatureSet, device, progress) -> None:
        feats = train.features
        n = int(feats.shape[0])
        self.mean = train_mean(feats, device, source_name(train)).cpu()
        bank = torch.empty((n, self.dim), dtype=torch.float32)
        for s, x in _chunks(feats, torch.device("cpu")):
            bank[s : s + x.shape[0]] = x
        # float16 halves the head file; only when it loses nothing (cached features are float16)
        half = bank.to(torch.float16)
        self.bank = half if torch.equal(half.to(torch.float32), bank) else bank
        self.bank_labels = train.labels.to("cpu", torch.int64).clone()
        self._index = None

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32)
        return _normalise(x - self.mean.to(x.device)) if self.options["metric"] == "cosine" else x

    def _get_index(self):
        if getattr(self, "_index", None) is None:
            index = faiss_index.make_index(self.dim, self.options["metric"], max_k=self.options["k"])
            step = max(1, _CPU_CHUNK_ELEMS // self.dim)
            for s in range(0, self.bank.shape[0], step):
                faiss_index.add(index, self._prep(self.bank[s : s + step]))
            self._index = index
        return self._index

    def _logits_chunk(self, x: torch.Tensor, device: torch.device) -> torch.Tensor:
        k = min(self.options["k"], int(self.bank.shape[0]))
        scores, ids = faiss_index.search(self._get_index(), self._prep(x), k)
        valid = ids >= 0
        if self.options["weighting"] == "count":
            votes = valid.astype(np.float32)
        else:
            # squared distance: L2 index gives it; for unit vectors it is 2 - 2 cos
            sq = scores if self.options["metric"] == "euclidean" else 2.0 - 2.0 * scores
            votes = np.where(valid, 1.0 / (1.0 + np.sqrt(np.maximum(sq, 0.0))), 0.0).astype(np.float32)
        labels = self.bank_labels[torch.from_numpy(np.where(valid, ids, 0))]
        out = torch.zeros((x.shape[0], self.num_classes))
        return out.scatter_add_(1, labels, torch.from_numpy(votes))

    def _state(self) -> dict:
        return {"mean": self.mean, "bank": self.bank, "bank_labels": self.bank_labels}

    def _load_state(self, state: dict) -> None:
        self.mean = get_tensor(state, "mean", (self.dim,)).float()
        bank = state.get("bank")
        n = int(bank.shape[0]) if isinstance(bank, torch.Tensor) and bank.dim() == 2 else -1
        if n < 1:
            raise LtcliError("head state: 'bank' missing or not an N x D tensor")
        self.bank = get_tensor(state, "bank", (n, self.dim))
        labels = get_tensor(state, "bank_labels", (n,), floating=False).to(torch.int64)
        if int(labels.min()) < 0 or int(labels.max()) >= self.num_classes:
            raise LtcliError("head state: 'bank_labels' out of range for the class count")
        self.bank_labels = labels
        self._index = None

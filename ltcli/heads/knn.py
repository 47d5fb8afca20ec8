"""`knn`: k nearest training features through FAISS (beyond the paper).

metric='cosine' centres the features on the train mean and L2-normalises them (inner
product); metric='euclidean' uses them as they are (L2). A query's score for class j sums
the votes of its k nearest train samples of class j:
  weighting='distance' (default): each neighbour votes 1 / (1 + d), d its euclidean distance
      (for cosine the chordal distance sqrt(2 - 2 cos) between unit vectors);
  weighting='count': each neighbour votes 1.
Classes without a vote score below every voted class, ordered by the cosine similarity of
the query to their mean (so top-5 is a similarity ranking, not a tie-break).

The train features are not copied into the head: it refers to the train cache by path and
content checksum (rows_sha256) and searches it in chunks (index='flat': exact), or keeps an
approximate index (index='ivf' | 'hnsw', `ltcli.neighbours`, FAISS's own serialisation checked by
sha256) whose candidates are re-ranked exactly against the cache. A FeatureSet that is no file
(the Python API) is kept in the head."""

from __future__ import annotations

import time

import numpy as np
import torch

from .. import faiss_index, neighbours
from ..errors import LtcliError
from ..featureset import FeatureSet
from ..options import Opt
from .base import Head, _CPU_CHUNK_ELEMS, _bad_rows, check_chunk_finite, get_int, get_tensor, source_name
from .ncm import _chunks, _normalise, train_mean
from .registry import register

RECALL_QUERIES = 500  # queries (held-out or train rows) that measure an index's recall at fit time
VOTE_ROWS = 2048  # queries turned into class scores at a time
QUERY_BYTES = 256 << 20  # float32 queries scored at a time (32k at D = 2048)


def _balanced_rows(labels: np.ndarray, num_classes: int, rng: np.random.Generator, count: int) -> np.ndarray:
    """Sorted row ids: a random class (uniformly over the classes present), then one of its rows."""
    order = np.argsort(labels, kind="stable")
    counts = np.bincount(labels, minlength=num_classes)
    starts = np.cumsum(counts) - counts
    present = np.flatnonzero(counts)
    cls = present[rng.integers(len(present), size=count)]
    return np.unique(order[starts[cls] + (rng.random(count) * counts[cls]).astype(np.int64)])


def _without(ids: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
    """Each row's first k ids other than its own (the query's own train row)."""
    out = np.full((ids.shape[0], k), -1, dtype=np.int64)
    for i, (row, me) in enumerate(zip(ids, own)):
        rest = row[row != me][:k]
        out[i, : len(rest)] = rest
    return out


@register
class KNNHead(Head):
    method = "knn"
    order = 60
    summary = "k nearest training features, similarity-weighted votes (exact, or an IVF / HNSW index)"
    options_spec = {
        "k": Opt(10, int, "neighbours that vote", min=1, max=10_000),
        "metric": Opt("cosine", str, "cosine or euclidean", choices=faiss_index.METRICS),
        "weighting": Opt("distance", str, "vote 1/(1+d) or 1 per neighbour", choices=("distance", "count")),
        "index": Opt("flat", str, "flat: exact search of the train cache; ivf: an inverted file of 4-bit PQ codes "
                     "(D/8 bytes a row); hnsw: a graph over 8-bit codes (D bytes a row); both re-ranked exactly "
                     "against the cache", choices=neighbours.INDEXES),
        "nlist": Opt(None, int, "ivf: inverted lists (default 4 * sqrt(N))", min=1, max=1 << 20, optional=True),
        "recall": Opt(neighbours.TARGET_RECALL, float, "ivf / hnsw: the recall@k against exact search that fit "
                      "tunes nprobe / efSearch to reach; lower is faster and finds fewer of the true neighbours",
                      positive=True, max=1.0),
    }
    checks_values_on_device = True  # train_mean checks NaN/inf in its pass

    @property
    def uses_held_out(self) -> bool:  # an approximate index's recall is measured on held-out queries
        return self.options["index"] != "flat"

    # ---- fitting -------------------------------------------------------------------------
    def _fit(self, train: FeatureSet, device, progress) -> None:
        feats = train.features
        self.mean = train_mean(feats, device, source_name(train)).cpu()
        self._mean_cache = None
        self.bank_labels = train.labels.to("cpu", torch.int64).clone()
        self.class_means = self._class_means(train)
        path, chain = train.attrs.get("path"), train.attrs.get("rows_sha256")
        self.bank, self.bank_file, self.bank_chain = None, None, None
        if path and chain:
            from pathlib import Path

            self.bank_file, self.bank_chain = str(Path(path).resolve()), str(chain)
        else:  # an in-memory FeatureSet: keep its rows (float16 when that loses nothing)
            bank = torch.empty((len(self.bank_labels), self.dim), dtype=torch.float32)
            for s, x in _chunks(feats, torch.device("cpu")):
                bank[s : s + x.shape[0]] = x
            half = bank.to(torch.float16)
            self.bank = half if torch.equal(half.to(torch.float32), bank) else bank
        self._source = feats
        self.index_bytes, self.index_sha, self.knob, self.recall = None, None, 0, None
        self.list_centroids = None
        self.depth = neighbours.default_depth(min(self.options["k"], len(self.bank_labels)))
        if self.options["index"] != "flat":
            self._build_index(train)
        self._index = None

    def _class_means(self, train: FeatureSet) -> torch.Tensor:
        """Normalised mean of each class's normalised, centred features (for the tie-break), at
        float16 precision: they only order the classes no neighbour voted for, and are saved as
        float16 (half the head at iNat size: 8,142 x 2,048 means)."""
        sums = torch.zeros((self.num_classes, self.dim))
        for s, x in _chunks(train.features, torch.device("cpu")):
            sums.index_add_(0, self.bank_labels[s : s + x.shape[0]], _normalise(x - self.mean))
        return _normalise(sums).half().float()

    def _build_index(self, train: FeatureSet) -> None:
        kind, n, metric = self.options["index"], len(self.bank_labels), self.options["metric"]
        k = min(self.options["k"], n)
        rng = np.random.default_rng(0)
        sample = self._rows(np.sort(rng.choice(n, size=neighbours.training_rows(n), replace=False)))
        if kind == "ivf":
            nlist = neighbours.ivf_lists(n, len(sample), self.options["nlist"])
            index = self._index = neighbours.build_ivf(self._chunks, self.dim, metric, sample, nlist)
            limit, what = nlist, f"IVF-PQ, {nlist} lists, nprobe"
        else:
            index = self._index = neighbours.build_hnsw(self._chunks, self.dim, metric, sample)
            limit, what = neighbours.KNOBS["hnsw"][-1], "HNSW-SQ8, efSearch"
        del sample
        # recall is measured as a balanced test set would see it: one row of a random class per
        # query (tail classes as often as head ones), from the held-out split where fit was given
        # one (the run's val), else from train, its own row left out of both answers
        held = self._held_out if self._held_out is not None and len(self._held_out.labels) else None
        if held is not None:
            ids = _balanced_rows(held.labels.numpy(), self.num_classes, rng, RECALL_QUERIES)
            queries, asked = self._held_rows(held, ids), f"class-balanced {held.split} queries"
        else:
            ids = _balanced_rows(self.bank_labels.numpy(), self.num_classes, rng, RECALL_QUERIES)
            queries, asked = self._rows(ids), "class-balanced train queries, each without itself"
        depth_k = min(k + (held is None), n)  # one more for a train query's own row
        t0 = time.perf_counter()
        _, truth = neighbours.exact_search(queries, self._chunks, depth_k, metric)
        exact_s = time.perf_counter() - t0
        truth = truth if held is not None else _without(truth, ids, k)

        def found(q, knob, depth):
            got = self._search(q, depth_k, knob, depth)[1]
            return got if held is not None else _without(got, ids, k)

        self.knob, self.depth, self.recall, bound = neighbours.tune_knob(found, kind, queries, truth, limit, k, n,
                                                                         self.options["recall"])
        t0 = time.perf_counter()
        self._search(queries, k, self.knob, self.depth)
        speedup = exact_s / max(time.perf_counter() - t0, 1e-9)
        if kind == "ivf":  # stored apart from the index, at float16
            self.list_centroids = neighbours.take_centroids(index)
        data, self.index_sha = neighbours.serialize(index)
        self.index_bytes = torch.from_numpy(data.copy())
        if kind == "ivf":
            neighbours.put_centroids(index, self.list_centroids)
        deeper = "" if self.depth == neighbours.default_depth(k) else f", {self.depth} candidates re-ranked"
        # an index pays only where the neighbours gather in a few cells; where it does not, say so
        pace = (f"{speedup:.1f}x faster than exact search on them" if speedup >= 1 else
                f"{1 / speedup:.1f}x slower than exact search on them: on these features --index flat (the default) "
                "is the better choice")
        self.fit_note = (f"{kind} index ({what} {self.knob}{deeper}): recall@{k} {self.recall:.3f} against exact "
                         f"search on {len(queries)} {asked} (at least {bound:.3f} with "
                         f"{neighbours.CONFIDENCE:.0%} confidence), {pace}")

    def _held_rows(self, held: FeatureSet, ids: np.ndarray) -> np.ndarray:
        """Prepared rows `ids` (sorted) of the held-out features, refusing NaN / inf."""
        x = held.features[torch.from_numpy(ids)].to(torch.float32)
        bad = _bad_rows(x)
        if bad.numel():
            raise LtcliError(f"{source_name(held)}: features contain NaN or inf (row {int(ids[int(bad[0])])})")
        return self._prep(x)

    def _search(self, q: np.ndarray, k: int, knob: int, depth: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of the k best bank rows: the index's best `depth` at `knob`, re-ranked exactly."""
        index = self._get_index()
        neighbours.set_knob(index, knob)
        return neighbours.rerank(q, neighbours.candidates(index, q, depth), self._rows, k, self.options["metric"])

    # ---- the bank ------------------------------------------------------------------------
    def _prep(self, x) -> np.ndarray:
        """float32 rows (views averaged) as the index holds them, as a NumPy array (what FAISS
        takes); converted by torch, whose float16 -> float32 is about twice NumPy's speed."""
        src = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
        t = src.to(torch.float32)
        t = t.mean(dim=1) if t.dim() == 3 else (t.clone() if t is src else t)  # never edit the caller's rows
        if self.options["metric"] == "cosine":
            t -= self._mean_t()
            t /= torch.linalg.vector_norm(t, dim=1, keepdim=True).clamp_min(1e-12)
        return np.ascontiguousarray(t.numpy())

    def _mean_t(self) -> torch.Tensor:
        if getattr(self, "_mean_cache", None) is None:
            self._mean_cache = self.mean.to(torch.float32)
        return self._mean_cache

    def _bank_features(self) -> torch.Tensor:
        if self.bank is not None:
            return self.bank
        source = getattr(self, "_source", None)
        if source is None:
            source = self._source = self._open_bank()
        return source

    def _open_bank(self) -> torch.Tensor:
        from pathlib import Path

        from ..cache import read_attrs, read_features

        def chain_of(path) -> str | None:
            try:
                return read_attrs(path).get("rows_sha256")
            except LtcliError:
                return None

        # the run was moved or copied (perhaps with another run now at its old place): its own features
        moved = Path(getattr(self, "file", "") or ".").resolve().parent.parent / "features" / Path(self.bank_file).name
        chain = chain_of(self.bank_file)
        if chain != self.bank_chain and moved.exists() and chain_of(moved) == self.bank_chain:
            self.bank_file, chain = str(moved), self.bank_chain
        if chain is None:
            raise LtcliError(f"{self.bank_file}: the train features this kNN head searches are missing or "
                             "unreadable (keep them beside the head, or refit it)")
        if chain != self.bank_chain:
            raise LtcliError(f"{self.bank_file}: not the train features this kNN head was fitted on (its "
                             "checksum differs); refit the head")
        fs = read_features(self.bank_file, mmap=True)
        if fs.features.shape[0] != len(self.bank_labels):
            raise LtcliError(f"{self.bank_file}: holds {fs.features.shape[0]} rows, the head {len(self.bank_labels)}")
        return fs.features

    def _chunks(self):
        feats = self._bank_features()
        step = max(1, _CPU_CHUNK_ELEMS // max(1, feats[0].numel()))
        for s in range(0, int(feats.shape[0]), step):
            yield s, self._prep(feats[s : s + step])

    def _rows(self, ids: np.ndarray) -> np.ndarray:
        """Prepared bank rows `ids` (sorted), gathered from the memory-mapped cache."""
        return self._prep(self._bank_features().numpy()[np.asarray(ids, dtype=np.int64)])

    def _get_index(self):
        if self.index_bytes is not None and getattr(self, "_index", None) is None:
            index = neighbours.deserialize(self.index_bytes.numpy(), self.index_sha, "kNN head")
            if self.list_centroids is not None:  # older ivf heads keep them inside the index
                neighbours.put_centroids(index, self.list_centroids)
            self._index = index
        return getattr(self, "_index", None)

    # ---- scoring -------------------------------------------------------------------------
    def iter_logits(self, feats: torch.Tensor, *, device=None, source: str = "features", progress=None):
        """Scores of every query, VOTE_ROWS at a time. Queries go in blocks of up to QUERY_BYTES
        (each block is one pass over the bank for the exact search); progress(queries done, queries)."""
        self.check_features(feats, source)
        n = int(feats.shape[0])
        block = max(1, QUERY_BYTES // (4 * self.dim))
        k = min(self.options["k"], len(self.bank_labels))
        for s in range(0, n, block):
            q = self._queries(feats[s : s + block], s, source)
            if self.options["index"] == "flat":
                scores, ids = neighbours.exact_search(q, self._chunks, k, self.options["metric"])
            else:
                scores, ids = self._search(q, k, self.knob, self.depth)
            for r in range(0, q.shape[0], VOTE_ROWS):  # N x C temporaries stay small at any C
                yield s + r, self._votes(q[r : r + VOTE_ROWS], scores[r : r + VOTE_ROWS], ids[r : r + VOTE_ROWS])
            if progress is not None:
                progress(s + q.shape[0], n)

    def _queries(self, feats: torch.Tensor, start: int, source: str) -> np.ndarray:
        """float32 queries as the index holds the bank, refusing NaN / inf (row numbers from `start`)."""
        q = np.empty((int(feats.shape[0]), self.dim), dtype=np.float32)
        step = max(1, _CPU_CHUNK_ELEMS // max(1, feats[0].numel())) if len(q) else 1
        for s in range(0, len(q), step):
            x = feats[s : s + step].to(torch.float32)
            check_chunk_finite(x.reshape(x.shape[0], -1), start + s, source)
            q[s : s + x.shape[0]] = self._prep(x)
        return q

    def _votes(self, q: np.ndarray, scores: np.ndarray, ids: np.ndarray) -> torch.Tensor:
        valid = ids >= 0
        if self.options["weighting"] == "count":
            votes = valid.astype(np.float32)
        else:
            # squared distance: L2 gives it; for unit vectors it is 2 - 2 cos
            sq = scores if self.options["metric"] == "euclidean" else 2.0 - 2.0 * scores
            votes = np.where(valid, 1.0 / (1.0 + np.sqrt(np.maximum(sq, 0.0))), 0.0).astype(np.float32)
        labels = self.bank_labels[torch.from_numpy(np.where(valid, ids, 0))]
        out = torch.zeros((q.shape[0], self.num_classes))
        out.scatter_add_(1, labels, torch.from_numpy(votes))
        if self.class_means is None:
            return out
        # unvoted classes: below every vote, by similarity to their mean ((cos - 1) / 4 in [-0.5, 0))
        qc = torch.from_numpy(q) if self.options["metric"] == "cosine" else _normalise(torch.from_numpy(q) - self.mean)
        similarity = (qc @ self.class_means.t() - 1.0) / 4.0 - 1e-6
        return torch.where(out > 0, out, similarity)

    def _logits_chunk(self, x, device):  # pragma: no cover - iter_logits() is overridden
        raise NotImplementedError

    # ---- persistence ---------------------------------------------------------------------
    def _state(self) -> dict:
        state = {"mean": self.mean, "bank_labels": self.bank_labels, "knob": int(self.knob), "depth": int(self.depth)}
        if self.class_means is not None:
            state["class_means"] = self.class_means.half()
        if self.bank is not None:
            state["bank"] = self.bank
        else:
            state.update(bank_file=self.bank_file, bank_rows_sha256=self.bank_chain)
        if self.index_bytes is not None:
            state.update(index=self.index_bytes, index_sha256=self.index_sha)
        if self.list_centroids is not None:
            state["list_centroids"] = torch.from_numpy(self.list_centroids)
        if self.recall is not None:
            state["recall"] = float(self.recall)
        return state

    def _load_state(self, state: dict) -> None:
        self.mean = get_tensor(state, "mean", (self.dim,)).float()
        self._mean_cache = None
        # heads of ltcli 0.1 have neither class means (no similarity order below the votes) nor a knob
        means = get_tensor(state, "class_means", (self.num_classes, self.dim), optional=True)
        self.class_means = None if means is None else means.float()
        labels = state.get("bank_labels")
        n = int(labels.shape[0]) if isinstance(labels, torch.Tensor) and labels.dim() == 1 else -1
        if n < 1:
            raise LtcliError("head state: 'bank_labels' missing or not a vector")
        labels = get_tensor(state, "bank_labels", (n,), floating=False).to(torch.int64)
        if int(labels.min()) < 0 or int(labels.max()) >= self.num_classes:
            raise LtcliError("head state: 'bank_labels' out of range for the class count")
        self.bank_labels = labels
        self.bank = get_tensor(state, "bank", (n, self.dim), optional=True)
        self.bank_file, self.bank_chain = state.get("bank_file"), state.get("bank_rows_sha256")
        if self.bank is None and not (isinstance(self.bank_file, str) and isinstance(self.bank_chain, str)):
            raise LtcliError("head state: neither 'bank' nor 'bank_file' / 'bank_rows_sha256'")
        self.knob = get_int(state, "knob", min_value=0) if "knob" in state else 0
        k = min(self.options["k"], n)
        self.depth = get_int(state, "depth", min_value=k) if "depth" in state else neighbours.default_depth(k)
        self.index_bytes, self.index_sha = None, None
        self.recall = state.get("recall")
        if self.options["index"] != "flat":
            index = state.get("index")
            if self.options["index"] == "ivf" and index is None and "centroids" in state:
                raise LtcliError("head state: an ivf kNN head of an earlier ltcli (inverted lists without codes); "
                                 "refit it with this version")
            if not isinstance(index, torch.Tensor) or index.dtype != torch.uint8 or index.dim() != 1:
                raise LtcliError("head state: 'index' missing or not a byte tensor")
            if not isinstance(state.get("index_sha256"), str):
                raise LtcliError("head state: 'index_sha256' missing")
            self.index_bytes, self.index_sha = index, state["index_sha256"]
        centroids = state.get("list_centroids")
        if centroids is not None and not (isinstance(centroids, torch.Tensor) and centroids.dtype == torch.float16
                                          and centroids.dim() == 2 and bool(torch.isfinite(centroids).all())):
            raise LtcliError("head state: 'list_centroids' is not a finite float16 matrix")
        self.list_centroids = None if centroids is None else centroids.numpy()
        self._index = None

"""Nearest-neighbour search over the train features, at any scale (FAISS).

- exact: every query against every bank row, the bank streamed in chunks (from the memory-
  mapped cache), the k best kept in a heap; memory is one chunk, whatever N is.
- ivf: an inverted file with product-quantised codes (IVF-PQ; IVF-Flat for small banks),
  nprobe lists visited per query.
- hnsw: a graph over 8-bit scalar-quantised vectors (HNSW-SQ8), efSearch candidates per query.

The approximate indexes return candidates that are then re-ranked exactly against the bank
rows (gathered from the cache), so only the candidates' order is approximate; their knob
(nprobe, efSearch) is chosen at fit time as the smallest that reaches the target recall
against the exact search on a sample of queries. Indexes are stored with FAISS's own
serialisation and checked by sha256."""

from __future__ import annotations

import hashlib
import math
from typing import Callable, Iterator

import numpy as np

from .errors import LtcliError
from .faiss_index import _faiss

INDEXES = ("flat", "ivf", "hnsw")
TARGET_RECALL = 0.95
KNOBS = {"ivf": (1, 2, 4, 8, 16, 32, 64, 128, 256, 512), "hnsw": (16, 32, 64, 128, 256, 512, 1024)}

# (start row, prepared float32 rows) over the bank, in order
Chunks = Callable[[], Iterator[tuple[int, np.ndarray]]]


def _metric(metric: str):
    faiss = _faiss()
    return faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2


def exact_search(queries: np.ndarray, chunks: Chunks, k: int, metric: str,
                 progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) of the k best bank rows per query; inner products (cosine) or squared
    distances (euclidean); ids -1 where the bank holds fewer than k rows."""
    faiss = _faiss()
    heap = faiss.ResultHeap(queries.shape[0], k, keep_max=metric == "cosine")
    for start, xb in chunks():
        kk = min(k, xb.shape[0])
        d, i = faiss.knn(queries, xb, kk, metric=_metric(metric))
        if kk < k:  # pad a short chunk: the heap wants k columns
            fill = -np.inf if metric == "cosine" else np.inf
            d = np.pad(d, ((0, 0), (0, k - kk)), constant_values=fill)
            i = np.pad(i, ((0, 0), (0, k - kk)), constant_values=-1)
        heap.add_result(np.ascontiguousarray(d, dtype=np.float32), np.where(i >= 0, i + start, -1).astype(np.int64))
        if progress is not None:
            progress(start + xb.shape[0])
    heap.finalize()
    return heap.D, heap.I


def pq_subquantizers(d: int) -> int:
    """About 16 dimensions per PQ sub-quantizer (a divisor of d): 128 bytes a 2048-d vector."""
    target = max(1, d // 16)
    return max(m for m in range(1, target + 1) if d % m == 0)


def build(kind: str, chunks: Chunks, n: int, d: int, metric: str, sample: np.ndarray,
          nlist: int | None = None, seed: int = 0):
    """An approximate index over the bank: trained on `sample`, then every chunk added."""
    faiss = _faiss()
    m = _metric(metric)
    if kind == "ivf":
        # ~4 sqrt(N) lists, with at least 39 training points each (FAISS's k-means rule)
        nlist = nlist or int(max(1, min(4 * math.sqrt(n), len(sample) // 39)))
        quantizer = faiss.IndexFlat(d, m)
        if n * d * 4 <= 64 << 20:  # a small bank: its vectors as they are
            index = faiss.IndexIVFFlat(quantizer, d, nlist, m)
        else:
            index = faiss.IndexIVFPQ(quantizer, d, nlist, pq_subquantizers(d), 8, m)
        index.cp.seed = seed
    elif kind == "hnsw":  # the graph over 8-bit scalar-quantised vectors (D bytes each)
        index = faiss.IndexHNSWSQ(d, faiss.ScalarQuantizer.QT_8bit, 32, m)
    else:
        raise LtcliError(f"--index {kind}: choose {', '.join(INDEXES)}")
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    for _, xb in chunks():
        index.add(xb)
    return index


def set_knob(index, kind: str, value: int) -> None:
    faiss = _faiss()
    if kind == "ivf":
        faiss.extract_index_ivf(index).nprobe = int(value)
    else:
        index.hnsw.efSearch = int(value)


def candidates(index, queries: np.ndarray, k: int) -> np.ndarray:
    """Ids of the approximate index's best max(10k, 64) rows per query (-1 padded)."""
    _, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), max(10 * k, 64))
    return ids


def rerank(queries: np.ndarray, ids: np.ndarray, rows: Callable[[np.ndarray], np.ndarray], k: int,
           metric: str, chunk: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Exact scores of each query's candidates (bank rows fetched by `rows(sorted unique ids)`);
    the k best, as exact_search returns them. Queries go `chunk` at a time, so the gathered
    candidate rows stay small (chunk x candidates x D)."""
    scores = np.empty((queries.shape[0], k), dtype=np.float32)
    best = np.empty((queries.shape[0], k), dtype=np.int64)
    for s in range(0, queries.shape[0], chunk):
        scores[s : s + chunk], best[s : s + chunk] = _rerank(queries[s : s + chunk], ids[s : s + chunk], rows, k,
                                                             metric)
    return scores, best


def _rerank(queries, ids, rows, k, metric):
    valid = ids >= 0
    uniq, inverse = np.unique(np.where(valid, ids, 0), return_inverse=True)
    bank = rows(uniq)[inverse.reshape(ids.shape)]  # nq x kc x d
    if metric == "cosine":
        s = np.einsum("qd,qcd->qc", queries, bank)
        s = np.where(valid, s, -np.inf)
        order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    else:
        s = ((bank - queries[:, None, :]) ** 2).sum(-1)
        s = np.where(valid, s, np.inf)
        order = np.argsort(s, axis=1, kind="stable")[:, :k]
    best = np.take_along_axis(s, order, 1).astype(np.float32)
    best_ids = np.where(np.isfinite(best), np.take_along_axis(ids, order, 1), -1)
    return best, best_ids


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each query's true k neighbours that were found."""
    hits = [len(set(f[f >= 0]) & set(t[t >= 0])) / max(1, (t >= 0).sum()) for f, t in zip(found, truth)]
    return float(np.mean(hits)) if hits else 1.0


def tune_knob(index, kind: str, queries: np.ndarray, truth: np.ndarray, rows, k: int, metric: str,
              target: float = TARGET_RECALL) -> tuple[int, float]:
    """The smallest nprobe / efSearch whose re-ranked results reach `target` recall@k."""
    recall = 0.0
    value = KNOBS[kind][0]
    for value in KNOBS[kind]:
        if kind == "ivf" and value > _faiss().extract_index_ivf(index).nlist:
            break
        set_knob(index, kind, value)
        _, ids = rerank(queries, candidates(index, queries, k), rows, k, metric)
        recall = recall_at(ids, truth)
        if recall >= target:
            break
    set_knob(index, kind, value)
    return value, recall


def serialize(index) -> tuple[np.ndarray, str]:
    data = _faiss().serialize_index(index)
    return data, hashlib.sha256(data.tobytes()).hexdigest()


def deserialize(data: np.ndarray, sha256: str, where: str):
    if hashlib.sha256(np.ascontiguousarray(data).tobytes()).hexdigest() != sha256:
        raise LtcliError(f"{where}: its FAISS index does not match its checksum (a damaged head file)")
    try:
        return _faiss().deserialize_index(np.ascontiguousarray(data, dtype=np.uint8))
    except RuntimeError as exc:
        raise LtcliError(f"{where}: its FAISS index cannot be read ({str(exc).splitlines()[0][:100]})") from None

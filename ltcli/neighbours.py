"""Nearest-neighbour search over the train features, at any scale (FAISS).

- exact: every query against every bank row, the bank streamed in chunks (from the memory-
  mapped cache), the k best kept in a heap; memory is one chunk, whatever N is.
- ivf: an inverted file over the cache. k-means centroids (FAISS) split the bank into lists;
  the index is the centroids and each row's list, so it is small (no vector is copied). A
  query visits its `nprobe` nearest lists and is scored exactly against their rows, read
  from the cache a list at a time for all the queries that visit it.
- hnsw: a graph over 8-bit scalar-quantised vectors (HNSW-SQ8; D bytes a row), whose
  candidates are re-ranked exactly against the cache rows.

The knob (nprobe, efSearch) is chosen at fit time as the smallest that reaches the target
recall against the exact search on a sample of queries. The HNSW index is stored with FAISS's
own serialisation and checked by sha256."""

from __future__ import annotations

import hashlib
import math
from typing import Callable, Iterator

import numpy as np

from .errors import LtcliError
from .faiss_index import _faiss

INDEXES = ("flat", "ivf", "hnsw")
TARGET_RECALL = 0.95
KNOBS = {"ivf": tuple(2 ** i for i in range(21)), "hnsw": (16, 32, 64, 128, 256, 512, 1024, 2048)}

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


def train_ivf(sample: np.ndarray, n: int, metric: str, nlist: int | None = None, seed: int = 0) -> np.ndarray:
    """k-means centroids (nlist x D float32) of a sample of the bank: ~4 sqrt(N) lists, with
    at least 20 training points each."""
    nlist = int(nlist or max(1, min(4 * math.sqrt(n), len(sample) // 20)))
    nlist = max(1, min(nlist, len(sample)))
    km = _faiss().Kmeans(sample.shape[1], nlist, niter=20, seed=seed, spherical=metric == "cosine",
                         verbose=False, min_points_per_centroid=1)
    km.train(np.ascontiguousarray(sample, dtype=np.float32))
    return km.centroids.astype(np.float32)


def assign_lists(chunks: Chunks, centroids: np.ndarray, metric: str) -> np.ndarray:
    """The list (nearest centroid) of every bank row, int32."""
    faiss = _faiss()
    out = []
    for _, xb in chunks():
        _, i = faiss.knn(xb, centroids, 1, metric=_metric(metric))
        out.append(i[:, 0].astype(np.int32))
    return np.concatenate(out) if out else np.zeros(0, np.int32)


def ivf_search(queries: np.ndarray, centroids: np.ndarray, lists: np.ndarray, rows: Callable, k: int, nprobe: int,
               metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) as exact_search returns them, over the rows of each query's nprobe nearest
    lists. Each list is read once for every query that visits it."""
    faiss = _faiss()
    nq, nprobe = queries.shape[0], int(min(nprobe, centroids.shape[0]))
    _, probes = faiss.knn(queries, centroids, nprobe, metric=_metric(metric))  # nq x nprobe
    order = np.argsort(lists, kind="stable")
    bounds = np.searchsorted(lists[order], np.arange(centroids.shape[0] + 1))
    sign = -1.0 if metric == "cosine" else 1.0  # lower `sign * score` is better
    best_s = np.full((nq, k), np.inf, dtype=np.float32)  # the running k best, as sign * score
    best_i = np.full((nq, k), -1, dtype=np.int64)
    flat = probes.ravel()
    visit = np.argsort(flat, kind="stable")  # (query, slot) pairs grouped by list
    starts = np.searchsorted(flat[visit], np.arange(centroids.shape[0] + 1))
    for lst in np.unique(flat[flat >= 0]):
        members = np.sort(order[bounds[lst] : bounds[lst + 1]])
        if len(members) == 0:
            continue
        qi = visit[starts[lst] : starts[lst + 1]] // nprobe
        bank = rows(members)
        s = queries[qi] @ bank.T
        if metric != "cosine":  # squared distances
            s = (queries[qi] ** 2).sum(1, keepdims=True) - 2 * s + (bank ** 2).sum(1)[None]
        s = (sign * s).astype(np.float32)
        kk = min(k, len(members))
        top = np.argpartition(s, kk - 1, axis=1)[:, :kk]
        merged_s = np.concatenate([best_s[qi], np.take_along_axis(s, top, 1)], axis=1)
        merged_i = np.concatenate([best_i[qi], members[top]], axis=1)
        keep = np.argpartition(merged_s, k - 1, axis=1)[:, :k]
        best_s[qi], best_i[qi] = np.take_along_axis(merged_s, keep, 1), np.take_along_axis(merged_i, keep, 1)
    order_k = np.argsort(best_s, axis=1, kind="stable")
    scores = np.take_along_axis(best_s, order_k, 1) * sign
    ids = np.take_along_axis(best_i, order_k, 1)
    return scores.astype(np.float32), np.where(np.isfinite(scores), ids, -1)


def build_hnsw(chunks: Chunks, d: int, metric: str, sample: np.ndarray):
    """HNSW over 8-bit scalar-quantised vectors (the quantiser trained on `sample`)."""
    index = _faiss().IndexHNSWSQ(d, _faiss().ScalarQuantizer.QT_8bit, 32, _metric(metric))
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    for _, xb in chunks():
        index.add(xb)
    return index


def set_knob(index, value: int) -> None:
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


def tune_knob(search: Callable[[np.ndarray, int], np.ndarray], kind: str, queries: np.ndarray, truth: np.ndarray,
              limit: int, target: float = TARGET_RECALL) -> tuple[int, float]:
    """The smallest knob value (of KNOBS[kind], at most `limit`) whose search(queries, value) ->
    ids reaches `target` recall against `truth`."""
    recall, value = 0.0, KNOBS[kind][0]
    for value in KNOBS[kind]:
        value = min(value, limit)
        recall = recall_at(search(queries, value), truth)
        if recall >= target or value >= limit:
            break
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

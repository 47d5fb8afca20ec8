"""Nearest-neighbour search over the train features, at any scale (FAISS).

- exact: every query against every bank row, the bank streamed in chunks (from the memory-
  mapped cache), the k best kept in a heap; memory is one chunk, whatever N is. For cosine, on a
  CPU that multiplies bfloat16 natively, a chunk is first scored in bfloat16 (about 2.5x the
  float32 rate) and only the rows that could still enter a query's k best (within the products'
  proven rounding error of its k-th best so far) are scored in float32: still exact.
- ivf: an inverted file of product-quantised codes (FAISS IVF-PQ, 4-bit "fast scan": k-means
  centroids split the bank into lists, each row kept as D/8 bytes of codes). A query visits its
  `nprobe` nearest lists, scores their codes with SIMD table lookups (far cheaper than a dot
  product with each row), and its best candidates are re-ranked exactly against the cache.
- hnsw: a graph over 8-bit scalar-quantised vectors (HNSW-SQ8; D bytes a row), whose
  candidates are re-ranked exactly against the cache rows.

The knob (nprobe, efSearch) is chosen at fit time as the smallest that reaches the target
recall against the exact search on a sample of queries. Both indexes are stored with FAISS's
own serialisation and checked by sha256."""

from __future__ import annotations

import functools
import hashlib
import math
from typing import Callable, Iterator

import numpy as np
import torch

from .errors import LtcliError
from .faiss_index import _faiss
from .runtime import cpu_flags

INDEXES = ("flat", "ivf", "hnsw")
TARGET_RECALL = 0.95
TRAIN_SAMPLE = 16_384  # the fewest rows an approximate index is trained on (unless the bank has fewer)
# the fit's recall target must hold, with this confidence, for queries like its sample, not just the sample
CONFIDENCE = 0.95
CONFIDENCE_Z = 1.645  # CONFIDENCE's one-sided normal quantile
REFINE_STEPS = 3  # bisections between the last power of two short of the target and the first to reach it
KNOBS = {"ivf": tuple(2 ** i for i in range(21)), "hnsw": (16, 32, 64, 128, 256, 512, 1024, 2048)}

# (start row, prepared float32 rows) over the bank, in order
Chunks = Callable[[], Iterator[tuple[int, np.ndarray]]]


def _metric(metric: str):
    faiss = _faiss()
    return faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2


# None: prune with bfloat16 products where they pay: the CPU has them natively and D >= PRUNE_MIN_DIM
# (below it, finding the few rows to rescore costs more than the faster products save; measured by
# bench/exact_search.py); tests force True / False
PRUNE_WITH_BF16: bool | None = None
PRUNE_MIN_DIM = 1024
PRUNE_ROWS = 4096  # queries scored against a chunk at a time (4,096 x 8,192 bfloat16 scores: 64 MiB)


def exact_search(queries: np.ndarray, chunks: Chunks, k: int, metric: str,
                 progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) of the k best bank rows per query; inner products (cosine) or squared
    distances (euclidean); ids -1 where the bank holds fewer than k rows."""
    faiss = _faiss()
    heap = faiss.ResultHeap(queries.shape[0], k, keep_max=metric == "cosine")
    auto = queries.shape[1] >= PRUNE_MIN_DIM and _bf16_products_pay()
    prune = metric == "cosine" and queries.shape[0] > 0 and (auto if PRUNE_WITH_BF16 is None else PRUNE_WITH_BF16)
    queries16 = torch.from_numpy(queries).bfloat16() if prune else None
    query_norm = float(torch.linalg.vector_norm(torch.from_numpy(queries), dim=1).max()) if prune else 0.0
    for start, xb in chunks():
        # a heap starts filled with -FLT_MAX; once full, its root is the query's k-th best so far
        if prune and bool((heap.D[:, 0] > np.finfo(np.float32).min).all()):
            _add_pruned(heap, queries, queries16, query_norm, xb, start)
        else:
            _add_chunk(heap, queries, None, xb, start, k, metric)
        if progress is not None:
            progress(start + xb.shape[0])
    heap.finalize()
    return heap.D, heap.I


def _add_chunk(heap, queries: np.ndarray, subset: np.ndarray | None, xb: np.ndarray, start: int, k: int,
               metric: str) -> None:
    """The k best rows of one chunk for queries[subset] (None: all), scored in float32, into their heaps."""
    kk = min(k, xb.shape[0])
    q = queries if subset is None else np.ascontiguousarray(queries[subset])
    d, i = _faiss().knn(q, xb, kk, metric=_metric(metric))
    if kk < k:  # pad a short chunk: the heap wants k columns
        fill = -np.inf if metric == "cosine" else np.inf
        d = np.pad(d, ((0, 0), (0, k - kk)), constant_values=fill)
        i = np.pad(i, ((0, 0), (0, k - kk)), constant_values=-1)
    d, i = np.ascontiguousarray(d, dtype=np.float32), np.where(i >= 0, i + start, -1).astype(np.int64)
    if subset is None:
        heap.add_result(d, i)
    else:
        heap.add_result_subset(subset, d, i)


def bf16_error(d: int) -> float:
    """Bound on |bfloat16 product - float32 product| of two vectors of norm <= 1 in d dimensions:
    each factor rounded to 8 significant bits (relative error u = 2^-8 each), the result rounded
    to bfloat16 (u again), float32 sums of d terms in both (d 2^-24 each); every term scales with
    sum |q_i x_i| <= |q| |x| <= 1. A little margin for norms of 1 + float32 rounding."""
    return 1.01 * (3 * 2.0**-8 + 2 * d * 2.0**-24)


def _add_pruned(heap, queries: np.ndarray, queries16: torch.Tensor, query_norm: float, xb: np.ndarray,
                start: int) -> None:
    """One chunk into full heaps: scored in bfloat16, then only the rows whose bfloat16 score is
    within the proven error of a query's k-th best so far are scored in float32 (a row further
    below cannot beat it: its float32 score is at most its bfloat16 score plus the error)."""
    faiss = _faiss()
    if xb.shape[0] == 0:
        return
    xb = np.ascontiguousarray(xb, dtype=np.float32)
    chunk16 = torch.from_numpy(xb).bfloat16()
    norms = float(torch.linalg.vector_norm(torch.from_numpy(xb), dim=1).max()) * query_norm
    slack = bf16_error(xb.shape[1]) * max(norms, 1.0)
    for s in range(0, queries.shape[0], PRUNE_ROWS):
        e = min(s + PRUNE_ROWS, queries.shape[0])
        below = torch.from_numpy(heap.D[s:e, :1] - np.float32(slack))
        mask = (queries16[s:e] @ chunk16.T) > below  # rows that may still enter the k best
        q_row, x_row = mask.nonzero(as_tuple=True)  # row-major: grouped by query, in order
        if len(q_row) == 0:
            continue
        counts = torch.bincount(q_row, minlength=e - s)
        width = int(counts.max())
        if width > max(64, xb.shape[0] // 8):  # near-ties everywhere: scoring all in float32 is cheaper
            _add_chunk(heap, queries, np.arange(s, e), xb, start, heap.k, "cosine")
            continue
        place = torch.arange(len(q_row)) - (torch.cumsum(counts, 0) - counts)[q_row]
        ids = torch.zeros((e - s, width), dtype=torch.int64)
        ids[q_row, place] = x_row
        got = torch.zeros((e - s, width), dtype=torch.bool)
        got[q_row, place] = True
        ids_np, scores = ids.numpy(), np.empty((e - s, width), dtype=np.float32)
        q = np.ascontiguousarray(queries[s:e])
        faiss.fvec_inner_products_by_idx(faiss.swig_ptr(scores), faiss.swig_ptr(q), faiss.swig_ptr(xb),
                                         faiss.swig_ptr(ids_np), q.shape[1], e - s, width)
        valid = got.numpy()
        heap.add_result_subset(np.arange(s, e), np.where(valid, scores, -np.inf).astype(np.float32),
                               np.where(valid, ids_np + start, -1))


@functools.cache
def _bf16_products_pay() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX, from /proc/cpuinfo), torch
    reaches it (through oneDNN; without it bfloat16 products take a slow generic loop) and sums
    the products in float32, as bf16_error assumes: 1,024 products of 2^-10 sum to exactly 1 in
    float32, and stall at 0.5 in bfloat16."""
    if not torch.backends.mkldnn.is_available() or not {"avx512_bf16", "amx_bf16"} & cpu_flags():
        return False
    probe = torch.full((1, 1024), 2.0**-5, dtype=torch.bfloat16)
    return float(probe @ probe.T) == 1.0


def training_rows(n: int) -> int:
    """Rows of the bank an approximate index is trained on: at least TRAIN_SAMPLE (128 MiB at
    D = 2048), and the ~20 a list that k-means wants for ~4 sqrt(N) lists."""
    return min(n, max(TRAIN_SAMPLE, 20 * int(4 * math.sqrt(n))))


def ivf_lists(n: int, sample_rows: int, nlist: int | None = None) -> int:
    """~4 sqrt(N) lists, with at least 20 training points each (and at least one list)."""
    return max(1, min(int(nlist or max(1, min(4 * math.sqrt(n), sample_rows // 20))), sample_rows))


def build_ivf(chunks: Chunks, d: int, metric: str, sample: np.ndarray, nlist: int):
    """IVF-PQ fast scan: `nlist` k-means lists (trained on `sample`), each row as D/4 4-bit codes
    (one per 4 dimensions; D is zero-padded to a multiple of 4, which changes no distance)."""
    faiss = _faiss()
    padded = -(-d // 4) * 4
    if len(sample) < 16:  # each 4-bit sub-quantiser has 16 centroids; k-means needs as many points
        sample = np.resize(sample, (16, sample.shape[1]))
    quantizer = (faiss.IndexFlatIP if metric == "cosine" else faiss.IndexFlatL2)(padded)
    ivf = faiss.IndexIVFPQFastScan(quantizer, padded, int(nlist), padded // 4, 4, _metric(metric))
    for cp in (ivf.cp, ivf.pq.cp):  # seeded; no k-means warnings on small samples
        cp.seed, cp.min_points_per_centroid = 0, 1
    # (faiss's Python wrappers keep the quantizer and the inner index alive beside their owner)
    index = ivf if padded == d else faiss.IndexPreTransform(faiss.RemapDimensionsTransform(d, padded, False), ivf)
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    # the lists' centroids at float16 precision before any row is assigned: the head stores them
    # at half size (take_centroids), and the rows' lists are those the stored centroids give
    put_centroids(index, take_centroids(index))
    return _filled(index, chunks, None)


def build_hnsw(chunks: Chunks, d: int, metric: str, sample: np.ndarray):
    """HNSW over 8-bit scalar-quantised vectors (the quantiser trained on `sample`)."""
    index = _faiss().IndexHNSWSQ(d, _faiss().ScalarQuantizer.QT_8bit, 32, _metric(metric))
    return _filled(index, chunks, sample)


def _filled(index, chunks: Chunks, sample: np.ndarray | None):
    """The index trained on `sample` (None: already trained), then every bank row added."""
    if sample is not None:
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
    for _, xb in chunks():
        index.add(xb)
    return index


def take_centroids(index) -> np.ndarray:
    """An ivf index's list centroids as float16, taken out of it (its coarse quantiser emptied),
    so that a head stores them at half the size FAISS's serialisation would (11 MB of float32 at
    ImageNet-LT size); put_centroids puts them back."""
    quantizer = _faiss().extract_index_ivf(index).quantizer
    centroids = quantizer.reconstruct_n(0, quantizer.ntotal).astype(np.float16)
    quantizer.reset()
    return centroids


def put_centroids(index, centroids: np.ndarray) -> None:
    ivf = _faiss().extract_index_ivf(index)
    if centroids.shape != (ivf.nlist, ivf.d):
        raise LtcliError(f"head state: 'list_centroids' is {tuple(centroids.shape)}, the index needs "
                         f"{ivf.nlist} x {ivf.d}")
    ivf.quantizer.reset()
    ivf.quantizer.add(np.ascontiguousarray(centroids, dtype=np.float32))


def set_knob(index, value: int) -> None:
    """nprobe (ivf) or efSearch (hnsw)."""
    if hasattr(index, "hnsw"):
        index.hnsw.efSearch = int(value)
    else:
        _faiss().extract_index_ivf(index).nprobe = int(value)


def default_depth(k: int) -> int:
    """Candidates re-ranked exactly per query, unless fitting found the codes need more."""
    return max(10 * k, 64)


def candidates(index, queries: np.ndarray, depth: int, rows: int = 4096) -> np.ndarray:
    """Ids of the approximate index's best `depth` rows per query (-1 padded), `rows` queries a
    call: FAISS's per-call scratch (look-up tables, result heaps) grows with the queries it gets."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    ids = np.empty((queries.shape[0], int(depth)), dtype=np.int64)
    for s in range(0, queries.shape[0], rows):
        ids[s : s + rows] = index.search(queries[s : s + rows], int(depth))[1]
    return ids


# float32 candidate rows gathered per call: a few MiB stay in the CPU's caches between the gather,
# its preparation and the products (at 16 MiB the re-rank ran 2.5x faster than at 100 MiB)
RERANK_BYTES = 16 << 20


def rerank(queries: np.ndarray, ids: np.ndarray, rows: Callable[[np.ndarray], np.ndarray], k: int,
           metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Exact scores of each query's candidates (bank rows fetched by `rows(sorted unique ids)`);
    the k best, as exact_search returns them. Queries go a few at a time, so the gathered
    candidate rows stay small (RERANK_BYTES)."""
    scores = np.empty((queries.shape[0], k), dtype=np.float32)
    best = np.empty((queries.shape[0], k), dtype=np.int64)
    chunk = max(1, RERANK_BYTES // (4 * max(1, ids.shape[1] * queries.shape[1])))
    for s in range(0, queries.shape[0], chunk):
        scores[s : s + chunk], best[s : s + chunk] = _rerank(queries[s : s + chunk], ids[s : s + chunk], rows, k,
                                                             metric)
    return scores, best


def _rerank(queries, ids, rows, k, metric):
    valid = ids >= 0
    uniq, inverse = np.unique(np.where(valid, ids, 0), return_inverse=True)
    bank = np.ascontiguousarray(rows(uniq), dtype=np.float32)
    inverse = np.ascontiguousarray(inverse.reshape(ids.shape), dtype=np.int64)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    s = np.empty(ids.shape, dtype=np.float32)
    # each query against its own candidates (FAISS's SIMD loop; no query x candidate x D copy)
    faiss = _faiss()
    by_idx = faiss.fvec_inner_products_by_idx if metric == "cosine" else faiss.fvec_L2sqr_by_idx
    by_idx(faiss.swig_ptr(s), faiss.swig_ptr(queries), faiss.swig_ptr(bank), faiss.swig_ptr(inverse),
           queries.shape[1], ids.shape[0], ids.shape[1])
    if metric == "cosine":
        s = np.where(valid, s, -np.inf)
        order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    else:
        s = np.where(valid, s, np.inf)
        order = np.argsort(s, axis=1, kind="stable")[:, :k]
    best = np.take_along_axis(s, order, 1).astype(np.float32)
    best_ids = np.where(np.isfinite(best), np.take_along_axis(ids, order, 1), -1)
    return best, best_ids


def recall_hits(found: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Each query's fraction of its true k neighbours that were found."""
    return np.array([len(set(f[f >= 0]) & set(t[t >= 0])) / max(1, (t >= 0).sum()) for f, t in zip(found, truth)])


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each query's true k neighbours that were found."""
    return _mean(recall_hits(found, truth))


def _mean(hits: np.ndarray) -> float:
    return float(hits.mean()) if len(hits) else 1.0  # no query: nothing was missed


def recall_bound(hits: np.ndarray) -> float:
    """One-sided lower confidence bound (CONFIDENCE_Z standard errors) on the mean recall of
    queries like these: a knob tuned on a sample's mean would reach the target on new queries
    only about half the time."""
    if len(hits) < 2:
        return _mean(hits)
    return float(hits.mean() - CONFIDENCE_Z * hits.std(ddof=1) / math.sqrt(len(hits)))


def tune_knob(search: Callable[[np.ndarray, int, int], np.ndarray], kind: str, queries: np.ndarray,
              truth: np.ndarray, limit: int, k: int, rows: int,
              target: float = TARGET_RECALL) -> tuple[int, int, float, float]:
    """(knob, depth, recall, bound): the smallest knob value (of KNOBS[kind], at most `limit`)
    whose search(queries, knob, depth) -> ids reaches `target` recall against `truth` with
    confidence (recall_bound), at the default re-rank depth, then narrowed towards the previous
    one by REFINE_STEPS bisections; where even the largest knob does not reach it (codes too
    coarse to rank the true neighbours among the first candidates), the depth doubles until it
    does or covers all `rows`. recall is the queries' mean, bound its lower confidence bound."""
    depth = default_depth(k)

    def measure(value: int) -> tuple[float, float]:
        hits = recall_hits(search(queries, value, depth), truth)
        return _mean(hits), recall_bound(hits)

    short, (recall, bound), value = None, (0.0, 0.0), KNOBS[kind][0]
    for value in KNOBS[kind]:
        value = min(value, limit)
        recall, bound = measure(value)
        if bound >= target or value >= limit:
            break
        short = value
    # powers of two overshoot the knob the target needs by up to 2x (its search time with it)
    for _ in range(REFINE_STEPS if bound >= target and short is not None else 0):
        if value - short <= 1:
            break
        middle = (short + value) // 2
        got = measure(middle)
        if got[1] >= target:
            value, (recall, bound) = middle, got
        else:
            short = middle
    while bound < target and depth < rows:
        depth = min(2 * depth, rows)
        recall, bound = measure(value)
    return value, depth, recall, bound


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

"""Thin FAISS wrapper: exact (flat) indexes, on the GPU when faiss has GPUs, else on the CPU.

Both the `faiss-gpu` and `faiss-cpu` wheels install the same `faiss` module; the GPU
classes exist only in the former and only work when it sees a GPU, hence the guards."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from typing import Any

import numpy as np
import torch

from .errors import LtcliError
from .runtime import cpu_flags

METRICS = ("cosine", "euclidean")
# GPU flat search supports k (and nprobe) up to this value; above it we search on the CPU.
GPU_MAX_K = 2048
# Bytes of float32 query + result buffers handled per search call, so memory stays bounded.
_CHUNK_BYTES = 1 << 27

_gpu_resources: Any = None


def openblas_core(flags: frozenset[str]) -> str | None:
    """The OpenBLAS kernels a CPU with these flags can run: SKYLAKEX (AVX-512), HASWELL (AVX2 + FMA),
    or None (leave OpenBLAS's own detection)."""
    if {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"} <= flags:
        return "SKYLAKEX"
    if {"avx2", "fma"} <= flags:
        return "HASWELL"
    return None


@contextlib.contextmanager
def _openblas_steered():
    """faiss-cpu's wheels bundle an OpenBLAS whose CPU detection predates recent x86 server
    cores: on one it does not know (this project's Emerald Rapids Xeon) it falls back to generic
    SSE3 kernels, and FAISS's matrix products (k-means, flat and coarse-list search) run ~5x
    slower (bench/RESULTS.md). OpenBLAS reads OPENBLAS_CORETYPE when it loads: name the kernels
    this CPU can run, for that load only, unless the user chose them."""
    core = None if "OPENBLAS_CORETYPE" in os.environ else openblas_core(cpu_flags())
    if core is not None:
        os.environ["OPENBLAS_CORETYPE"] = core
    try:
        yield
    finally:
        if core is not None:
            os.environ.pop("OPENBLAS_CORETYPE", None)


@functools.cache
def _faiss():
    try:
        with _openblas_steered():
            import faiss
    except ImportError:  # pragma: no cover - faiss is a declared dependency
        raise LtcliError("faiss is not installed: pip install faiss-cpu (or faiss-gpu)") from None
    return faiss


def num_gpus() -> int:
    """GPUs that the installed faiss can use (0 for faiss-cpu or without a GPU)."""
    faiss = _faiss()
    if not (hasattr(faiss, "get_num_gpus") and hasattr(faiss, "StandardGpuResources")):
        return 0
    try:
        return int(faiss.get_num_gpus())
    except Exception:  # a GPU build without a usable driver
        return 0


def openblas_kernels() -> str | None:
    """The kernels faiss's own OpenBLAS runs (its core name, e.g. SkylakeX), or None where faiss
    brings no OpenBLAS of its own (MKL builds, conda's shared one) or this is not Linux."""
    _faiss()
    try:
        with open("/proc/self/maps") as f:
            libs = sorted({line.split()[-1] for line in f if "openblas" in line and "faiss" in line})
    except OSError:
        return None
    for lib in libs:
        try:
            corename = ctypes.CDLL(lib).openblas_get_corename
        except (OSError, AttributeError):
            continue
        corename.restype = ctypes.c_char_p
        return corename().decode()
    return None


def backend_name() -> str:
    """Which faiss backend make_index uses here (and on the CPU, its OpenBLAS kernels), for reports."""
    faiss = _faiss()
    version = getattr(faiss, "__version__", "?")
    n = num_gpus()
    kernels = openblas_kernels()
    return (f"faiss {version} gpu ({n} GPU)" if n else f"faiss {version} cpu") + (
        f", OpenBLAS {kernels}" if kernels else "")


def _resources():
    # One StandardGpuResources per process: it owns cuBLAS handles and a scratch pool.
    global _gpu_resources
    if _gpu_resources is None:
        _gpu_resources = _faiss().StandardGpuResources()
    return _gpu_resources


def make_index(dim: int, metric: str, *, use_gpu: bool | None = None, max_k: int | None = None):
    """An empty exact index: inner product for 'cosine' (callers L2-normalise), L2 for 'euclidean'.

    use_gpu=None picks the GPU when faiss has one and `max_k` (largest k to be searched)
    is within what GPU search supports."""
    if metric not in METRICS:
        raise LtcliError(f"--metric {metric}: unknown metric (choose from {', '.join(METRICS)})")
    faiss = _faiss()
    if use_gpu is None:
        use_gpu = num_gpus() > 0 and (max_k is None or max_k <= GPU_MAX_K)
    if use_gpu:
        cfg = faiss.GpuIndexFlatConfig()
        cfg.device = 0
        cls = faiss.GpuIndexFlatIP if metric == "cosine" else faiss.GpuIndexFlatL2
        return cls(_resources(), int(dim), cfg)
    cls = faiss.IndexFlatIP if metric == "cosine" else faiss.IndexFlatL2
    return cls(int(dim))


def as_float32(x) -> np.ndarray:
    """C-contiguous float32 numpy array (what faiss requires) from a tensor or array."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def _chunk_rows(dim: int, k: int) -> int:
    return max(1, _CHUNK_BYTES // (4 * (dim + 2 * k)))


def add(index, vectors, *, chunk_rows: int | None = None) -> None:
    """Add vectors (N x D tensor or array) in chunks, converting each chunk only."""
    n = int(vectors.shape[0])
    step = chunk_rows or _chunk_rows(index.d, 0)
    for start in range(0, n, step):
        index.add(as_float32(vectors[start : start + step]))


def pairwise(queries, base, metric: str, *, chunk_rows: int | None = None) -> np.ndarray:
    """Dense N x B scores of every query against every base vector, by FAISS's brute-force
    pairwise routine (on the GPU when faiss has one): inner products for 'cosine', squared
    distances for 'euclidean'. For a small base (e.g. C class means) this gives the same
    numbers as a k = B search, without the k-selection heap that costs ~3x the products."""
    if metric not in METRICS:
        raise LtcliError(f"--metric {metric}: unknown metric (choose from {', '.join(METRICS)})")
    faiss = _faiss()
    fmetric = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
    xb = as_float32(base)
    n = int(queries.shape[0])
    out = np.empty((n, xb.shape[0]), dtype=np.float32)
    step = chunk_rows or _chunk_rows(xb.shape[1], xb.shape[0])
    gpu = num_gpus() > 0 and hasattr(faiss, "pairwise_distance_gpu")
    for start in range(0, n, step):
        xq = as_float32(queries[start : start + step])
        if gpu:
            faiss.pairwise_distance_gpu(_resources(), xq, xb, D=out[start : start + len(xq)], metric=fmetric)
        else:
            out[start : start + len(xq)] = faiss.pairwise_distances(xq, xb, fmetric)
    return out


def search(index, queries, k: int, *, chunk_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """k-nearest search in chunks of queries: (scores float32 N x k, ids int64 N x k).

    scores are inner products for IP indexes and squared distances for L2 indexes;
    ids are -1 where the index holds fewer than k vectors."""
    n = int(queries.shape[0])
    k = int(k)
    scores = np.empty((n, k), dtype=np.float32)
    ids = np.empty((n, k), dtype=np.int64)
    step = chunk_rows or _chunk_rows(index.d, k)
    for start in range(0, n, step):
        d, i = index.search(as_float32(queries[start : start + step]), k)
        scores[start : start + len(d)] = d
        ids[start : start + len(i)] = i
    return scores, ids

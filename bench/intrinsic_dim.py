"""Intrinsic dimension of feature caches (TwoNN, Facco et al. 2017), as the kNN head sees them.

Whether an approximate kNN index (ltcli fit-head --method knn --index ivf|hnsw) finds the nearest
neighbours cheaply depends less on D than on the features' intrinsic dimension (ID): in few
dimensions the nearest neighbours are clearly nearer than the rest and sit in a few cells; in
many, every point is almost equally far. bench/scale.py's synthetic features are calibrated on
this figure; run it on your own caches to see which regime they are in.

    python bench/intrinsic_dim.py RUN/features/train.h5 [MORE.h5 ...] [--rows 100000] [--queries 2000]

Rows are centred on their mean and L2-normalised (the kNN head's cosine metric). For each query
row, r1 and r2 are the distances to its two nearest other rows; ID = n / sum(log(r2 / r1)) over
the 90 % of queries with the smallest ratios (Facco's recipe). Printed for a quarter, a half and
all of the rows: the estimate grows with the sample where noise dimensions show at small scales.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ltcli.cache import read_features  # noqa: E402


def prepared(x: np.ndarray) -> np.ndarray:
    x = x - x.mean(0)
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def twonn(bank: np.ndarray, queries: int, rng: np.random.Generator) -> float:
    """TwoNN estimate over `queries` rows of `bank` (each one's own row left out)."""
    import faiss

    q = bank[rng.choice(len(bank), size=min(queries, len(bank)), replace=False)]
    sims, _ = faiss.knn(q, bank, 3, metric=faiss.METRIC_INNER_PRODUCT)  # itself, then its two nearest
    r = np.sqrt(np.maximum(2.0 - 2.0 * sims[:, 1:], 1e-12))
    mu = r[:, 1] / r[:, 0]
    mu = np.sort(mu[np.isfinite(mu) & (mu > 1.0)])[: int(0.9 * len(mu))]
    return float(len(mu) / np.log(mu).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("caches", nargs="+", type=Path)
    ap.add_argument("--rows", type=int, default=100_000, help="rows read from each cache (a random sample)")
    ap.add_argument("--queries", type=int, default=2000)
    a = ap.parse_args()
    for path in a.caches:
        fs = read_features(path, mmap=True)
        n = int(fs.features.shape[0])
        rng = np.random.default_rng(0)
        take = np.sort(rng.choice(n, size=min(a.rows, n), replace=False))
        x = np.asarray(fs.features.numpy()[take], dtype=np.float32)
        x = prepared(x.mean(axis=1) if x.ndim == 3 else x)[rng.permutation(len(take))]
        sizes = sorted({max(3, len(x) // 4), max(3, len(x) // 2), len(x)})
        found = ", ".join(f"{m:,} rows {twonn(x[:m], a.queries, rng):.1f}" for m in sizes)
        print(f"{path}: D = {x.shape[1]}, TwoNN ID: {found}")


if __name__ == "__main__":
    main()

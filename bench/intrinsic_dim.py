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

    python bench/intrinsic_dim.py RUN/features/train.h5 --test RUN/features/test.h5 [--beside-generator]

How hard the test queries are for an index (what decides `--index ivf`'s speed-up on your data):
- query LID: the local intrinsic dimension at each test query (maximum-likelihood estimate from
  its 100 nearest train rows, Amsaleg et al. 2015; the measure Aumüller & Ceccarello 2019 rank
  nearest-neighbour benchmarks by). High LID: the 10th and the 1,000th neighbour are almost
  equally far, and no index finds the first ten cheaply.
- the lists an inverted file must visit: the train rows split into 4 sqrt(N) k-means lists, as
  `--index ivf` splits them; for each query's 10 true neighbours, the rank of their list among
  the lists nearest the query. Printed as recall@10 when a share of the lists is visited and
  scanned exactly (the best an ivf index can do there), and the share that recall 0.95 needs.
--beside-generator prints the same for bench/scale.py's synthetic features drawn with the same
class counts, so the generator can be checked against real features of the same shape.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ltcli.cache import read_features
from ltcli.faiss_index import _faiss


def prepared(x: np.ndarray, mean: np.ndarray | None = None) -> np.ndarray:
    """Centred (on `mean`, by default the rows' own) and L2-normalised, as the kNN head's cosine."""
    x = x - (x.mean(0) if mean is None else mean)
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def twonn(bank: np.ndarray, queries: int, rng: np.random.Generator) -> float:
    """TwoNN estimate over `queries` rows of `bank` (each one's own row left out)."""
    faiss = _faiss()

    q = bank[rng.choice(len(bank), size=min(queries, len(bank)), replace=False)]
    sims, _ = faiss.knn(q, bank, 3, metric=faiss.METRIC_INNER_PRODUCT)  # itself, then its two nearest
    r = np.sqrt(np.maximum(2.0 - 2.0 * sims[:, 1:], 1e-12))
    mu = r[:, 1] / r[:, 0]
    mu = np.sort(mu[np.isfinite(mu) & (mu > 1.0)])[: int(0.9 * len(mu))]
    return float(len(mu) / np.log(mu).sum())


def nearest(bank: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(inner products, ids) of each query's k nearest bank rows (prepared rows), exact."""
    faiss = _faiss()

    return faiss.knn(queries, bank, min(k, len(bank)), metric=faiss.METRIC_INNER_PRODUCT)


def query_lid(sims: np.ndarray) -> np.ndarray:
    """Each query's LID from the inner products with its k nearest rows (`nearest`):
    -1 / mean(log(r_i / r_k)), r the chordal distance."""
    r = np.sqrt(np.maximum(2.0 - 2.0 * sims, 1e-12))
    return -1.0 / np.mean(np.log(r[:, :-1] / r[:, -1:]), axis=1)


def list_ranks(bank: np.ndarray, queries: np.ndarray, truth: np.ndarray, seed: int = 0) -> tuple[np.ndarray, int]:
    """(ranks, nlist): for each of the queries' true neighbours (`truth`, ids from `nearest`), the
    rank (0 = nearest) of the list that holds it among the query's lists, with the bank split as
    `--index ivf` splits it (4 sqrt(N) k-means lists trained on as many rows, rows assigned by
    inner product)."""
    faiss = _faiss()

    from ltcli import neighbours

    n, d = bank.shape
    size = neighbours.training_rows(n)
    nlist = neighbours.ivf_lists(n, size)
    km = faiss.Kmeans(d, nlist, seed=seed, min_points_per_centroid=1, max_points_per_centroid=1 << 30)
    km.train(bank[:size])  # the bank is in random order
    lists = faiss.IndexFlatIP(d)
    lists.add(km.centroids)
    home = lists.search(bank, 1)[1][:, 0]
    order = lists.search(queries, nlist)[1]
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(nlist)[None, :].repeat(len(order), 0), axis=1)
    return np.take_along_axis(rank, home[truth], axis=1), nlist


def lists_needed(ranks: np.ndarray, nlist: int, target: float = 0.95) -> int:
    """The fewest lists a query must visit for recall@k >= target (each visited list scanned exactly)."""
    flat = np.sort(ranks.ravel())
    return int(flat[int(np.ceil(target * len(flat))) - 1]) + 1


def hardness(name: str, bank: np.ndarray, queries: np.ndarray) -> str:
    sims, ids = nearest(bank, queries, 100)  # one exact search serves the LID and the 10 true neighbours
    ranks, nlist = list_ranks(bank, queries, ids[:, :10])
    need = lists_needed(ranks, nlist)
    curve = " ".join(f"{f:.0%} {np.mean(ranks < max(1, round(f * nlist))):.3f}" for f in (0.01, 0.05, 0.2))
    return (f"{name}: {len(bank):,} train rows, {len(queries):,} test queries: query LID (k 100) median "
            f"{np.median(query_lid(sims)):.1f}; {nlist} lists: recall@10 visiting {curve}; "
            f"0.95 needs {need} lists ({need / nlist:.1%})")


def _rows(path: Path, rows: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(float32 rows, labels) of a random sample of `rows` rows (views averaged), in random order."""
    fs = read_features(path, mmap=True)
    n = int(fs.features.shape[0])
    take = np.sort(rng.choice(n, size=min(rows, n), replace=False))
    x = np.asarray(fs.features.numpy()[take], dtype=np.float32)
    perm = rng.permutation(len(take))
    return (x.mean(axis=1) if x.ndim == 3 else x)[perm], fs.labels.numpy()[take][perm]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("caches", nargs="+", type=Path)
    ap.add_argument("--rows", type=int, help="rows read from each cache (a random sample; default 100,000, and "
                    "all of the train cache with --test)")
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--test", type=Path, help="a test cache: how hard --queries of its rows are as queries against "
                    "the (one) train cache given")
    ap.add_argument("--beside-generator", action="store_true",
                    help="with --test: the same for bench/scale.py's generator, drawn with the same class counts")
    a = ap.parse_args()
    if a.test is not None:
        if len(a.caches) != 1:
            ap.error("--test takes exactly one train cache")
        rng = np.random.default_rng(0)
        train, train_y = _rows(a.caches[0], a.rows or sys.maxsize, rng)
        test, test_y = _rows(a.test, a.queries, rng)
        mean = train.mean(0)
        print(hardness(str(a.caches[0]), prepared(train, mean), prepared(test, mean)), flush=True)
        if a.beside_generator:
            import torch
            from scale import Generator

            g = Generator(int(max(train_y.max(), test_y.max())) + 1, seed=0)
            train = g.draw(torch.from_numpy(train_y)).numpy()
            test = g.draw(torch.from_numpy(test_y)).numpy()
            mean = train.mean(0)
            print(hardness("bench/scale.py's generator, same class counts", prepared(train, mean),
                           prepared(test, mean)))
        return
    for path in a.caches:
        rng = np.random.default_rng(0)
        x = prepared(_rows(path, a.rows or 100_000, rng)[0])
        sizes = sorted({max(3, len(x) // 4), max(3, len(x) // 2), len(x)})
        found = ", ".join(f"{m:,} rows {twonn(x[:m], a.queries, rng):.1f}" for m in sizes)
        print(f"{path}: D = {x.shape[1]}, TwoNN ID: {found}")


if __name__ == "__main__":
    main()

"""FAISS's matrix products: its bundled OpenBLAS as it loads by itself, and as ltcli loads it.

faiss-cpu's wheels bundle an OpenBLAS whose CPU detection predates recent x86 server cores; on
one it does not know it falls back to generic SSE3 kernels. ltcli names the kernels the CPU can
run when it loads faiss (`ltcli.faiss_index._openblas_steered`). This bench does the same work
in two fresh processes, one importing faiss bare and one through ltcli, one after the other,
and prints each one's OpenBLAS kernels and seconds (best of `--repeat`):
- flat search: 2,000 queries against 8,192 rows, D = 2,048, k = 10 (`faiss.knn`; exact search
  and an ivf index's coarse-list search are this product);
- k-means: 16,384 rows of D = 2,048 into 256 lists, 5 iterations (`faiss.Kmeans`, what
  `--index ivf` trains its lists with).

    python bench/faiss_blas.py [--repeat 3] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from machine import describe  # noqa: E402

WORK = """
import json, sys, time
import numpy as np
if sys.argv[1] == "ltcli":
    from ltcli.faiss_index import _faiss
    faiss = _faiss()
else:
    import faiss
from ltcli.faiss_index import openblas_kernels  # faiss is loaded by now: this only reads its kernels
core = openblas_kernels() or "unknown"
repeat, queries, rows, dim = map(int, sys.argv[2:6])
rng = np.random.default_rng(0)
q = rng.standard_normal((queries, dim), dtype=np.float32)
x = rng.standard_normal((2 * rows, dim), dtype=np.float32)
best = {"search_s": float("inf"), "kmeans_s": float("inf")}
for _ in range(repeat):
    t = time.perf_counter(); faiss.knn(q, x[:rows], 10, metric=faiss.METRIC_INNER_PRODUCT)
    best["search_s"] = min(best["search_s"], time.perf_counter() - t)
    km = faiss.Kmeans(dim, rows // 32, niter=5, seed=0, min_points_per_centroid=1)
    t = time.perf_counter(); km.train(x)
    best["kmeans_s"] = min(best["kmeans_s"], time.perf_counter() - t)
print(json.dumps({"openblas_core": core, **{k: round(v, 6) for k, v in best.items()},
                  "search_gflops": round(2 * queries * rows * dim / best["search_s"] / 1e9, 1)}))
"""


def measure(mode: str, repeat: int, queries: int = 2000, rows: int = 8192, dim: int = 2048) -> dict:
    """One fresh process (faiss imported "bare" or through "ltcli"): its OpenBLAS kernels, the
    best seconds of a k-10 flat search of `queries` against `rows` and of k-means of 2 x `rows`
    into rows / 32 lists."""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run([sys.executable, "-c", WORK, mode, *map(str, (repeat, queries, rows, dim))], env=env,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    bare, ltcli = measure("bare", a.repeat), measure("ltcli", a.repeat)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": describe(), "bare": bare,
              "ltcli": ltcli, "search_speedup": round(bare["search_s"] / ltcli["search_s"], 2),
              "kmeans_speedup": round(bare["kmeans_s"] / ltcli["kmeans_s"], 2)}
    for name, r in (("faiss bare", bare), ("through ltcli", ltcli)):
        print(f"{name:14s} OpenBLAS {r['openblas_core']:10s} flat search {r['search_s']:6.2f} s "
              f"({r['search_gflops']:.0f} GFLOP/s), k-means {r['kmeans_s']:6.2f} s", file=sys.stderr)
    text = json.dumps(result, indent=2)
    if a.out:
        a.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

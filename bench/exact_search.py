"""Exact kNN search: float32 against bfloat16-pruned (ltcli.neighbours.exact_search), by dimension.

The pruned search scores each chunk of the bank in bfloat16 and rescores in float32 only the rows
within the products' proven rounding error of a query's k-th best so far; both return the same
neighbours. This bench measures where pruning pays, which sets `neighbours.PRUNE_MIN_DIM`: at
each D, a bank of 6 x 2^24 / D unit rows (six of the search's 2^24-element chunks: as many
float32 products at every D) near a 32-d subspace, 2,000 queries, k = 10, both searches timed
in this process (best of `--repeat`), their neighbours compared; and, first, the matrix-product
rate in float32 and in bfloat16.

    python bench/exact_search.py [--dims 128,256,512,1024,2048] [--repeat 3] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ltcli import neighbours
from machine import describe

CHUNK = 1 << 24  # elements per bank chunk, as the kNN head streams the cache


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def product_rates(m: int = 4096, d: int = 2048, n: int = 32768, repeat: int = 3) -> dict:
    """GFLOP/s of one m x d by d x n matrix product in float32 and in bfloat16 (torch, best of `repeat`)."""
    import torch

    rates = {}
    a, b = torch.randn(m, d), torch.randn(d, n)
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        x, y = a.to(dtype), b.to(dtype)
        x @ y  # warm-up
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - t0)
        rates[name] = round(2 * m * d * n / min(times) / 1e9, 1)
    return rates


def compare(d: int, queries: int = 2000, k: int = 10, repeat: int = 3, seed: int = 0, chunk: int = CHUNK) -> dict:
    rng = np.random.default_rng(seed)
    n, step = 6 * chunk // d, chunk // d
    basis = rng.standard_normal((32, d))
    bank = unit(rng.standard_normal((n, 32)) @ basis + 0.5 * rng.standard_normal((n, d)))
    q = unit(rng.standard_normal((queries, 32)) @ basis + 0.5 * rng.standard_normal((queries, d)))

    def chunks():
        for s in range(0, n, step):
            yield s, bank[s : s + step]

    seconds, found = {False: [], True: []}, {}
    for _ in range(repeat):
        for prune in (False, True):  # alternated, so both see the same machine
            neighbours.PRUNE_WITH_BF16 = prune
            t0 = time.perf_counter()
            found[prune] = neighbours.exact_search(q, chunks, k, "cosine")
            seconds[prune].append(time.perf_counter() - t0)
    neighbours.PRUNE_WITH_BF16 = None
    same = float(np.mean(np.sort(found[False][1], 1) == np.sort(found[True][1], 1)))
    f32, b16 = min(seconds[False]), min(seconds[True])
    return {"dim": d, "bank_rows": n, "queries": queries, "k": k, "float32_s": round(f32, 3),
            "pruned_s": round(b16, 3), "speedup": round(f32 / b16, 2), "same_neighbours": same,
            "max_score_diff": float(np.abs(found[False][0] - found[True][0]).max())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", default="128,256,512,1024,2048")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    rates = product_rates()
    print(f"bfloat16 products native here: {neighbours._bf16_products_pay()}; a 4,096 x 2,048 x 32,768 "
          f"product: float32 {rates['float32']} GFLOP/s, bfloat16 {rates['bfloat16']} GFLOP/s", file=sys.stderr)
    rows = []
    for d in (int(x) for x in a.dims.split(",")):
        rows.append(compare(d, repeat=a.repeat))
        r = rows[-1]
        print(f"D {d:5d}: {r['bank_rows']:,} rows, float32 {r['float32_s']:.2f} s, pruned {r['pruned_s']:.2f} s "
              f"({r['speedup']:.2f}x), same neighbours {r['same_neighbours']:.4f}", file=sys.stderr)
    text = json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": describe(),
                       "bf16_native": neighbours._bf16_products_pay(), "product_gflops": rates, "results": rows},
                      indent=2)
    if a.out:
        a.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

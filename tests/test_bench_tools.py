"""The measuring tools under bench/ that published figures rest on."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))


@pytest.mark.parametrize("dim", [4, 12])
def test_twonn_finds_the_dimension_of_a_flat_manifold(dim):
    """Gaussian points in a random `dim`-dimensional subspace of R^64: the estimate is `dim`."""
    from intrinsic_dim import prepared, twonn

    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.standard_normal((64, dim)))[0]
    x = rng.standard_normal((20_000, dim)) @ basis.T + 5.0  # offset: centring is part of the recipe
    est = twonn(prepared(x), 2000, rng)
    assert abs(est - dim) < 0.2 * dim + 0.5, est


def test_scale_features_have_a_low_intrinsic_dimension():
    """The scale bench's modes vary along LOCAL directions: their ID sits far below that of the
    same generator with isotropic within-mode noise (LOCAL = R)."""
    import scale
    from intrinsic_dim import prepared, twonn

    y = torch.arange(200).repeat_interleave(40)
    ids = {}
    for local in (scale.LOCAL, scale.R):
        x = scale.Generator(200, seed=0, local=local).draw(y).numpy()
        ids[local] = twonn(prepared(x), 2000, np.random.default_rng(0))
    assert ids[scale.LOCAL] < 40 < ids[scale.R], ids


@pytest.mark.parametrize("dim", [4, 12])
def test_query_lid_finds_the_dimension_of_a_flat_manifold(dim):
    """Test queries drawn like the train rows, Gaussian in a `dim`-dimensional subspace of R^64:
    centred and normalised (the kNN head's cosine) they lie on a sphere of dimension dim - 1."""
    from intrinsic_dim import nearest, prepared, query_lid

    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.standard_normal((64, dim)))[0]
    train, test = (rng.standard_normal((n, dim)) @ basis.T + 5.0 for n in (20_000, 500))
    mean = train.mean(0)
    est = float(np.median(query_lid(nearest(prepared(train, mean), prepared(test, mean), 100)[0])))
    assert abs(est - (dim - 1)) < 0.15 * (dim - 1) + 0.5, est


def test_lists_needed_is_the_fewest_lists_reaching_the_recall():
    from intrinsic_dim import lists_needed

    ranks = np.array([[0, 1], [2, 3]])  # visiting p lists finds the neighbours ranked below p
    assert lists_needed(ranks, 4, target=0.5) == 2 and np.mean(ranks < 2) == 0.5
    assert lists_needed(ranks, 4, target=0.95) == 4 and lists_needed(ranks, 4, target=0.75) == 3


def test_an_inverted_file_needs_fewer_lists_where_features_cluster():
    """Queries among tight clusters find their neighbours in a few lists; among isotropic noise of
    the same dimension, in many. Every neighbour is in some list (visiting all finds all)."""
    from intrinsic_dim import list_ranks, lists_needed, nearest, prepared

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((100, 64))
    which = rng.integers(100, size=8_500)
    clustered = centres[which] + 0.1 * rng.standard_normal((8_500, 64))
    noise = rng.standard_normal((8_500, 64))
    share = {}
    for name, x in (("clustered", clustered), ("noise", noise)):
        bank, queries = prepared(x[:8_000], x[:8_000].mean(0)), prepared(x[8_000:], x[:8_000].mean(0))
        ranks, nlist = list_ranks(bank, queries, nearest(bank, queries, 10)[1])
        assert ranks.shape == (500, 10) and ranks.min() >= 0 and ranks.max() < nlist
        share[name] = lists_needed(ranks, nlist) / nlist
    assert share["clustered"] < 0.1 and share["noise"] > 0.3, share


def test_intrinsic_dim_reports_query_hardness_beside_the_generator(tiny_pipeline):
    """The command as RESULTS.md runs it: one line for the cache, one for the generator drawn
    with its class counts; a second train cache beside --test is refused."""
    import subprocess

    feats = tiny_pipeline / "features"
    tool = [sys.executable, str(BENCH / "intrinsic_dim.py")]
    out = subprocess.run([*tool, feats / "train.h5", "--test", feats / "test.h5", "--beside-generator"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 2 and lines[1].startswith("bench/scale.py's generator"), out.stdout
    for line in lines:
        share = float(line.rsplit("(", 1)[1].split("%")[0])
        assert "query LID (k 100) median" in line and 0 < share <= 100, line
    bad = subprocess.run([*tool, feats / "train.h5", feats / "val.h5", "--test", feats / "test.h5"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--test takes exactly one train cache" in bad.stderr


def test_exact_search_bench_compares_both_searches():
    """bench/exact_search.py times float32 and pruned search on the same bank and reports that
    they found the same neighbours (here on a small bank: 6 chunks of 2^16 elements)."""
    from exact_search import compare

    from ltcli import neighbours

    row = compare(64, queries=200, repeat=1, chunk=1 << 16)
    assert row["bank_rows"] == 6 * 1024 and row["same_neighbours"] == 1.0 and row["max_score_diff"] < 1e-5
    assert row["float32_s"] > 0 and row["pruned_s"] > 0 and neighbours.PRUNE_WITH_BF16 is None


def test_faiss_blas_bench_runs_the_same_work_bare_and_through_ltcli():
    """bench/faiss_blas.py: both processes report their OpenBLAS kernels and timings; through
    ltcli the kernels are those the CPU can run (where faiss bundles OpenBLAS and ltcli names them)."""
    from faiss_blas import measure

    from ltcli.faiss_index import openblas_core
    from ltcli.runtime import cpu_flags

    small = {"queries": 256, "rows": 1024, "dim": 128}
    bare, ltcli = measure("bare", 1, **small), measure("ltcli", 1, **small)
    for r in (bare, ltcli):
        assert r["search_s"] > 0 and r["kmeans_s"] > 0 and r["search_gflops"] > 0
    if ltcli["openblas_core"] != "unknown" and openblas_core(cpu_flags()):
        assert ltcli["openblas_core"].upper() == openblas_core(cpu_flags())


def test_scale_eval_floor_evaluates_the_ivf_head_at_one_list(tiny_pipeline, tmp_path):
    """bench/scale.py --eval-floor: the fitted ivf head saved at nprobe 1 outside heads/, then it,
    the fitted ivf and the flat head evaluated each in its own process, and the process start
    timed; the bound it reports is the flat eval's seconds over the floor's."""
    from conftest import check_ok, copy_run, run_cli
    from scale import eval_floor

    from ltcli.heads import load_head

    run = copy_run(tiny_pipeline, tmp_path / "run")
    check_ok(run_cli(["fit-head", "--run", run, "--method", "knn", "--index", "ivf"]))
    check_ok(run_cli(["fit-head", "--run", run, "--method", "knn", "--out", run / "heads" / "knn-flat.pt"]))
    got = eval_floor(run)["eval_floor"]
    floor, _ = load_head(run / "heads-floor" / "knn-nprobe1.pt")
    fitted, _ = load_head(run / "heads" / "knn.pt")
    assert floor.knob == 1 and fitted.knob >= 1 and floor.index_sha == fitted.index_sha
    assert not (run / "heads" / "knn-nprobe1.pt").exists()
    for name in ("flat", "ivf", "nprobe1"):
        assert got[name]["eval"]["exit"] == 0 and got[name]["eval"]["seconds"] > 0, got[name]
        assert 0 <= got[name]["overall"] <= 1
    assert got["process_start"]["exit"] == 0
    assert got["flat_over_floor"] == round(got["flat"]["eval"]["seconds"] / got["nprobe1"]["eval"]["seconds"], 2)

"""ltcli's classifier stages at ImageNet-LT and iNaturalist-2018 size, on one machine.

Writes synthetic feature caches with the real datasets' long-tail profiles (float16, D = 2048,
a stage-1 classifier biased like a long-tailed joint model). The features are class-conditional
Gaussians shaped like a CNN's: they live near a 128-d subspace (real embeddings have a fast-
falling spectrum), each class is 4 modes (sub-populations: poses, varieties) whose centres
overlap other classes', so a class mean is a poor summary of a class and nearest neighbours mean
something, and each mode varies along a few directions of its own, so the features' intrinsic
dimension (TwoNN, at the scale of nearest neighbours) is that of real CNN features (~20, not the
~80 of isotropic noise in the subspace; bench/intrinsic_dim.py, bench/RESULTS.md). The class
centres themselves are independent draws, with none of the hierarchy of real classes (species
of a genus sit together), so a tail-class query's neighbours lie in every direction: the hard
case for an approximate index;
then runs each command as a user would (`python -m ltcli ...`, one process each) and records
its wall time and peak RSS (GNU time's maximum resident set size) beside the size of the float16 train
matrix. The memory ceiling each command must keep: that matrix plus 2 GiB.

    python bench/scale.py --size imagenet-lt            # 115,846 x 2048 train, 1,000 classes
    python bench/scale.py --size inat2018               # 437,513 x 2048 train, 8,142 classes
    options: --workdir DIR (default /tmp/ltcli-scale-SIZE), --epochs N (cRT / LWS epochs; default
    10 at ImageNet-LT, 1 at iNat, where one epoch is ~5 minutes on 2 cores), --out FILE.json,
    --only WORDS (rerun only the commands containing one of the comma-separated words, e.g.
    `eval,ivf`, taking the others' figures from --out's earlier results: a bench resumed after
    a code change says so in its JSON: "rerun_only" lists each rerun, dated, after the earlier
    ones), --ivf-sweep (after a run: the ivf kNN
    head's recall and speed-up over exact search at nprobe 16 ... 1,024, on 2,000 test queries),
    --compare-indexes (after a run: an hnsw kNN head fitted and evaluated beside the flat and ivf
    ones, each command's seconds and peak RSS, head sizes and test accuracy), --recall-targets
    0.9,0.95,0.98 (after a run: an ivf kNN head fitted at each `--recall` target and evaluated
    beside the flat one: nprobe, eval seconds, test accuracy, recall on test queries),
    --eval-floor (after a run: the ivf head evaluated at nprobe 1, one list a query, beside the
    flat and ivf ones, and the process start alone: the least a kNN eval can cost here, so the
    most any index can speed it up)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from heads_speed import imagenet_lt_counts  # noqa: E402
from ltcli.cache import FeatureWriter  # noqa: E402
from ltcli.faiss_index import _faiss  # noqa: E402
from machine import describe  # noqa: E402

GIB = 1 << 30
D = 2048
SIZES = {
    # train total, n_max, n_min, classes, val per class, test per class
    "imagenet-lt": (115_846, 1280, 5, 1000, 20, 50),
    "inat2018": (437_513, 1000, 2, 8142, 3, 3),
}


def counts_for(size: str) -> np.ndarray:
    total, n_max, n_min, c, _, _ = SIZES[size]
    return imagenet_lt_counts(total, n_max, n_min, c)


R, MODES = 128, 4  # the features' subspace and the modes of each class
# Each mode varies along its own few directions (a pose, a colour): its local dimension. Chosen,
# before any index was run on it, as the value (of 128, 32, 16, 8) whose features' intrinsic
# dimension (TwoNN, bench/intrinsic_dim.py) came closest to real CNN features': 19-20 on ltcli's
# own CIFAR ResNet-32 caches; 20 (iNat size) to 27 (ImageNet-LT size) with LOCAL = 8, against
# 68-84 with isotropic noise in the subspace (LOCAL = R), which this bench used before
# (bench/RESULTS.md, "Features with a real intrinsic dimension").
LOCAL = 8
SIGMA_CLASS, SIGMA_MODE, SIGMA_WITHIN, SIGMA_OFF = 0.12, 0.3, 0.3, 0.05


class Generator:
    """x = P (a_c + b_{c,m} + U_{c,m} w) + e: class centre a_c, one of its modes b_{c,m}, within-mode
    variation w along the mode's own LOCAL directions U_{c,m} (all in the subspace P; as much variance
    as isotropic noise of SIGMA_WITHIN in R dimensions), and a little isotropic noise e."""

    def __init__(self, c: int, seed: int = 0, local: int = LOCAL):
        self.gen = torch.Generator().manual_seed(seed)
        self.P = torch.linalg.qr(torch.randn(D, R, generator=self.gen))[0]
        self.centres = torch.randn(c, R, generator=self.gen) * SIGMA_CLASS
        self.modes = self.centres[:, None] + torch.randn(c, MODES, R, generator=self.gen) * SIGMA_MODE
        self.local = local
        # orthonormal directions of each mode (c x MODES x R x local; 133 MB at iNat size)
        self.U = torch.linalg.qr(torch.randn(c * MODES, R, local, generator=self.gen))[0].reshape(c, MODES, R, local)
        self.mu = self.centres @ self.P.T  # class means in feature space

    def draw(self, y: torch.Tensor) -> torch.Tensor:
        m = torch.randint(MODES, (len(y),), generator=self.gen)
        w = torch.randn(len(y), self.local, generator=self.gen) * SIGMA_WITHIN * (R / self.local) ** 0.5
        latent = self.modes[y, m] + torch.einsum("nrk,nk->nr", self.U[y, m], w)
        return latent @ self.P.T + torch.randn(len(y), D, generator=self.gen) * SIGMA_OFF


def write_split(path: Path, counts: np.ndarray, g: Generator, weight, bias, train_counts, split: str,
                names: list[str]) -> None:
    """One cache file, written in chunks through ltcli's own writer (no float32 copy of it all)."""
    y = torch.repeat_interleave(torch.arange(len(counts)), torch.as_tensor(counts))
    y = y[torch.randperm(len(y), generator=g.gen)].numpy()
    attrs = {"split": split, "class_names": names, "train_class_counts": [int(c) for c in train_counts],
             "backbone_sha256": "5ca1e" * 12 + "0000", "data_fingerprint": f"synthetic-{split}",
             "dataset_id": "scale-bench", "transform": "synthetic gaussians", "views": 1, "arch": "synthetic",
             "seed": 0, "stage1": "instance-balanced probe, 2 epochs"}
    with FeatureWriter(path, rows=len(y), dim=D, labels=y, index=np.arange(len(y)), attrs=attrs, weight=weight,
                       bias=bias, batch_size=8192, overwrite=True, quiet=True) as w:
        for s in range(0, len(y), w.batch_size):
            w.write(s, g.draw(torch.from_numpy(y[s : s + w.batch_size])).to(torch.float16).numpy())
        w.finish()


def make_caches(size: str, run: Path) -> int:
    """The run's features/{train,val,test}.h5; returns the bytes of the float16 train matrix.

    The stage-1 classifier is what joint training on long-tailed data leaves: a linear
    classifier fitted with instance-balanced sampling on the train features (2 epochs of
    ltcli's cRT recipe with --sampling instance), biased towards the frequent classes."""
    from ltcli.cache import read_features, rewrite_with_classifier
    from ltcli.heads import build_head

    _, _, _, c, val_per, test_per = SIZES[size]
    counts = counts_for(size)
    g = Generator(c)
    names = [f"c{i:05d}" for i in range(c)]
    feats = run / "features"
    if not (feats / "test.h5").exists():
        write_split(feats / "train.h5", counts, g, None, None, counts, "train", names)
        probe = build_head("crt", sampling="instance", epochs=2).fit(read_features(feats / "train.h5", mmap=True))
        rewrite_with_classifier(feats / "train.h5", probe.weight, probe.bias, "instance-balanced probe, 2 epochs")
        for split, per in (("val", val_per), ("test", test_per)):
            write_split(feats / f"{split}.h5", np.full(c, per), g, probe.weight, probe.bias, counts, split, names)
    return int(counts.sum()) * D * 2


def run_measured(args: list[str]) -> dict:
    """One ltcli command in its own process: wall seconds, peak RSS, exit code. The RSS comes
    from GNU time (`/usr/bin/time -f %M`): a child forked from this (large) process would
    report this process's pages as its own high-water mark."""
    import tempfile

    with tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-f", "ltcli-maxrss-kb %M", sys.executable, "-m", "ltcli",
                               *map(str, args)], stdout=subprocess.DEVNULL, stderr=err,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
        wall = time.perf_counter() - t0
        err.seek(0)
        lines = [line.strip() for line in err.read().splitlines() if line.strip()]
    rss = next(int(line.split()[-1]) * 1024 for line in reversed(lines) if line.startswith("ltcli-maxrss-kb"))
    tail = [line for line in lines if not line.startswith("ltcli-maxrss-kb")][-4:]
    return {"command": "ltcli " + " ".join(map(str, args)), "seconds": round(wall, 1), "peak_rss": rss,
            "exit": proc.returncode, "stderr_tail": tail}


def bare_products(run: Path, epochs: int, batch: int = 512) -> float:
    """Seconds of the matrix products one cRT epoch needs, bare: per step x Wᵀ (forward) and
    gᵀ x (backward) on float32 batches of the cached rows, as many steps as `epochs` epochs."""
    from ltcli.cache import read_features

    fs = read_features(run / "features" / "train.h5", mmap=True)
    n, c = fs.features.shape[0], fs.num_classes
    steps = epochs * -(-n // batch)
    g = torch.Generator().manual_seed(1)
    xs = [fs.features[i * batch : (i + 1) * batch].to(torch.float32) for i in range(8)]
    w = torch.rand(c, D, generator=g) * 0.02 - 0.01
    t0 = time.perf_counter()
    for i in range(steps):
        x = xs[i % 8]
        z = x @ w.T
        w.sub_(torch.mm(z.t(), x), alpha=1e-9)
    return time.perf_counter() - t0


def knn_recall(run: Path, queries: int = 2000) -> dict:
    """recall@k of the ivf kNN head's neighbours against the exact ones, on test queries."""
    return ivf_tradeoff(run, queries, knobs=None)[0]


def ivf_tradeoff(run: Path, queries: int = 2000, knobs=(16, 32, 64, 128, 256, 512, 1024),
                 head: Path | None = None) -> list[dict]:
    """The ivf kNN head (default heads/knn.pt) searched at each nprobe of `knobs` (None: the
    head's own) on test queries: recall@k against exact search and the speed-up over it, both
    timed in this process."""
    faiss = _faiss()

    from ltcli import neighbours
    from ltcli.cache import read_features
    from ltcli.heads import load_head

    ivf, _ = load_head(head or run / "heads" / "knn.pt")
    test = read_features(run / "features" / "test.h5", mmap=True)
    q = ivf._queries(test.features[:queries], 0, "test")
    k, nlist = ivf.options["k"], int(faiss.extract_index_ivf(ivf._get_index()).nlist)
    labels = test.labels[:queries].numpy()

    def predict(scores, ids):  # the head's own vote, as eval scores it
        return ivf._votes(q, scores, ids).argmax(1).numpy()

    t0 = time.perf_counter()
    exact_scores, exact = neighbours.exact_search(q, ivf._chunks, k, ivf.options["metric"])
    exact_s = time.perf_counter() - t0
    exact_pred = predict(exact_scores, exact)
    rows = []
    for nprobe in knobs or (ivf.knob,):
        t0 = time.perf_counter()
        scores, found = ivf._search(q, k, nprobe, ivf.depth)
        seconds = time.perf_counter() - t0
        pred = predict(scores, found)
        # recall@k is strict where the k nearest are near-ties; what a user sees is the vote
        rows.append({"recall@10": neighbours.recall_at(found, exact), "queries": len(q), "nprobe": nprobe,
                     "nlist": nlist, "lists_visited": round(nprobe / nlist, 4), "search_s": round(seconds, 2),
                     "exact_s": round(exact_s, 2), "speedup": round(exact_s / seconds, 2),
                     "same_prediction_as_exact": round(float((pred == exact_pred).mean()), 4),
                     "top1": round(float((pred == labels).mean()), 4),
                     "exact_top1": round(float((exact_pred == labels).mean()), 4)})
        print(f"nprobe {nprobe:5d} ({nprobe / nlist:6.1%} of lists): recall@{k} {rows[-1]['recall@10']:.3f}, "
              f"same class as exact {rows[-1]['same_prediction_as_exact']:.3f}, top-1 {rows[-1]['top1']:.3f} "
              f"(exact {rows[-1]['exact_top1']:.3f}), {seconds:6.1f} s against exact {exact_s:.1f} s "
              f"({exact_s / seconds:.1f}x)", file=sys.stderr)
    return rows


def evaluate(run: Path, name: str, head: Path) -> dict:
    """`ltcli eval` of one head in its own process: seconds, peak RSS, head size, test accuracy."""
    reports = run / f"reports-compare-{name}"
    res = run_measured(["eval", "--heads", head, "--out", reports, "--run", run])
    test = next(iter(json.loads((reports / "eval-test.json").read_text())["heads"].values()))
    row = {"eval": res, "head_bytes": head.stat().st_size,
           **{k: round(test[k], 4) for k in ("overall", "many", "medium", "few")}}
    print(f"{name:5s} eval {res['seconds']:7.1f} s  {res['peak_rss'] / GIB:5.2f} GiB  head "
          f"{row['head_bytes'] / 1e6:7.1f} MB  top-1 {100 * test['overall']:.1f}", file=sys.stderr)
    return row


def compare_indexes(run: Path) -> dict:
    """The three kNN indexes side by side on a benched cache (its ivf head heads/knn.pt and flat
    head heads/knn-flat.pt): fit an hnsw head, then evaluate hnsw, flat and ivf on test, each in
    its own process, one after the other."""
    heads = {name: run / "heads" / file for name, file in
             (("hnsw", "knn-hnsw.pt"), ("flat", "knn-flat.pt"), ("ivf", "knn.pt"))}
    fit = run_measured(["fit-head", "--method", "knn", "--index", "hnsw", "--out", heads["hnsw"], "--run", run])
    rows = {"hnsw": {"fit": fit}}
    for name, head in heads.items():
        rows.setdefault(name, {}).update(evaluate(run, name, head))
    print(f"hnsw fit {fit['seconds']:.1f} s; {' '.join(fit['stderr_tail'])}", file=sys.stderr)
    return {"train_cache_bytes": (run / "features" / "train.h5").stat().st_size, "indexes": rows}


def recall_targets(run: Path, targets: list[float]) -> dict:
    """ivf kNN heads fitted at each `--recall` target, each evaluated on test beside the flat head
    (one process a command, one after the other), with its recall against exact search on 2,000
    test queries: what a lower or higher target costs and buys."""
    from ltcli.heads import load_head

    rows = {"flat": evaluate(run, "flat", run / "heads" / "knn-flat.pt")}
    for target in targets:
        head = run / "heads" / f"knn-recall-{target}.pt"
        fit = run_measured(["fit-head", "--method", "knn", "--index", "ivf", "--recall", target, "--out", head,
                            "--run", run])
        fitted, _ = load_head(head)
        rows[str(target)] = {"fit": fit, "nprobe": fitted.knob, "depth": fitted.depth, "fit_recall": fitted.recall,
                             "test": ivf_tradeoff(run, knobs=None, head=head)[0], **evaluate(run, f"r{target}", head)}
    return {"recall_targets": rows}


def eval_floor(run: Path) -> dict:
    """The least a kNN eval can cost on this machine, whatever the index and the features: the ivf
    head searched at nprobe 1 (one list a query; the same re-rank, votes, ranks and reading),
    evaluated beside the flat and the fitted ivf heads, each in its own process, one after the
    other; and the process's start alone (`ltcli --help`: Python and ltcli's imports). The flat
    eval's seconds over the floor's bound the speed-up any index can give an eval here."""
    from ltcli.heads import load_head, save_head

    head, provenance = load_head(run / "heads" / "knn.pt")
    head.knob = 1
    floor = run / "heads-floor" / "knn-nprobe1.pt"  # not in heads/: an eval of every head leaves it out
    floor.parent.mkdir(exist_ok=True)
    save_head(head, floor, provenance)
    rows = {name: evaluate(run, name, path) for name, path in
            (("flat", run / "heads" / "knn-flat.pt"), ("ivf", run / "heads" / "knn.pt"), ("nprobe1", floor))}
    start = run_measured(["--help"])
    bound = rows["flat"]["eval"]["seconds"] / rows["nprobe1"]["eval"]["seconds"]
    print(f"process start {start['seconds']:.1f} s; the flat eval is at most {bound:.1f}x the cheapest "
          f"search's (nprobe 1); the fitted ivf head's "
          f"{rows['flat']['eval']['seconds'] / rows['ivf']['eval']['seconds']:.1f}x", file=sys.stderr)
    return {"eval_floor": {**rows, "process_start": start, "flat_over_floor": round(bound, 2)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), required=True)
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--only", help="comma-separated words; rerun only the commands containing one")
    ap.add_argument("--ivf-sweep", action="store_true",
                    help="only search the existing ivf kNN head at nprobe 16..1024 (recall, speed-up) and stop")
    ap.add_argument("--compare-indexes", action="store_true",
                    help="only fit an hnsw kNN head and evaluate it beside the flat and ivf ones, and stop")
    ap.add_argument("--recall-targets", metavar="R1,R2,...",
                    help="only fit an ivf kNN head at each --recall target and evaluate it beside the flat one, and stop")
    ap.add_argument("--eval-floor", action="store_true",
                    help="only evaluate the ivf kNN head at nprobe 1 beside the flat and ivf ones (the least a kNN "
                    "eval can cost here), and stop")
    a = ap.parse_args()
    if a.ivf_sweep or a.compare_indexes or a.recall_targets or a.eval_floor:
        run = a.workdir or Path(f"/tmp/ltcli-scale-{a.size}")
        needed = [run / "heads" / name for name in ("knn.pt", "knn-flat.pt")] + [run / "features" / "test.h5"]
        missing = [str(p) for p in needed if not p.exists()]
        if missing:
            ap.error(f"{missing[0]} is missing: run `python bench/scale.py --size {a.size}` on {run} first")
        found = ({"ivf_sweep": ivf_tradeoff(run)} if a.ivf_sweep else compare_indexes(run) if a.compare_indexes
                 else eval_floor(run) if a.eval_floor
                 else recall_targets(run, [float(t) for t in a.recall_targets.split(",")]))
        text = json.dumps({"size": a.size, "date": time.strftime("%Y-%m-%d"),
                           "machine": describe(), **found},
                          indent=2, default=str)
        if a.out:
            a.out.write_text(text + "\n")
        print(text)
        return
    earlier, reruns = {}, []
    if a.only:
        if not (a.out and a.out.exists()):
            ap.error("--only needs --out FILE.json holding the earlier results")
        before = json.loads(a.out.read_text())
        earlier = {r["command"]: r for r in before["commands"]}
        reruns = before.get("rerun_only") or []
        reruns = [reruns] if isinstance(reruns, str) else list(reruns)
    rerun = [w for w in (a.only or "").split(",") if w]
    run = a.workdir or Path(f"/tmp/ltcli-scale-{a.size}")
    epochs = a.epochs or (10 if a.size == "imagenet-lt" else 1)
    t0 = time.perf_counter()
    train_bytes = make_caches(a.size, run)
    made = time.perf_counter() - t0
    r = ["--run", run]
    steps = [
        ["info", run / "features" / "train.h5", "--json"],
        ["fit-head", "--method", "joint", *r],
        ["fit-head", "--method", "ncm", *r],
        ["fit-head", "--method", "crt", "--epochs", epochs, *r],
        ["fit-head", "--method", "lws", "--epochs", epochs, *r],
        ["fit-head", "--method", "knn", "--index", "ivf", *r],
        ["fit-head", "--method", "knn", "--out", run / "heads" / "knn-flat.pt", *r],
        ["tune-tau", "--method", "tau-norm", *r],
        ["tune-tau", "--method", "logit-adjust", *r],
        ["eval", "--heads", "joint,ncm,crt,lws,tau-norm,logit-adjust,knn", *r],
        ["eval", "--heads", "knn", "--out", run / "reports-knn-ivf", *r],
        ["eval", "--heads", run / "heads" / "knn-flat.pt", "--out", run / "reports-knn-flat", *r],
    ]
    results = []
    ceiling = train_bytes + 2 * GIB
    print(f"{a.size}: caches written in {made:.0f} s; float16 train matrix {train_bytes / GIB:.2f} GiB; "
          f"ceiling {ceiling / GIB:.2f} GiB", file=sys.stderr)
    for args in steps:
        command = "ltcli " + " ".join(map(str, args))
        if rerun and not any(w in command for w in rerun) and command in earlier:
            results.append(earlier[command])
            continue
        res = run_measured(args)
        res["within_ceiling"] = res["peak_rss"] <= ceiling
        results.append(res)
        print(f"{res['seconds']:8.1f} s  {res['peak_rss'] / GIB:6.2f} GiB  exit {res['exit']}  {res['command']}",
              file=sys.stderr)
        for line in res["stderr_tail"]:
            if "index" in line or "error" in line or "failed" in line:
                print(f"          {line}", file=sys.stderr)
    bare = bare_products(run, epochs)
    knn = knn_recall(run)
    print(f"kNN on test: ivf eval {results[-2]['seconds']} s, flat {results[-1]['seconds']} s "
          f"({results[-1]['seconds'] / results[-2]['seconds']:.1f}x); recall@10 of ivf against flat "
          f"{knn['recall@10']:.3f} on {knn['queries']} test queries", file=sys.stderr)
    fit = {r["command"].split("--method ")[1].split()[0]: r["seconds"] for r in results if "fit-head" in r["command"]}
    print(f"bare products of {epochs} cRT epoch(s): {bare:.1f} s; cRT fit {fit['crt']:.1f} s "
          f"({fit['crt'] / bare:.2f}x), LWS fit {fit['lws']:.1f} s ({fit['lws'] / bare:.2f}x)", file=sys.stderr)
    head = run / "heads" / "knn.pt"
    summary = {
        "size": a.size, "date": time.strftime("%Y-%m-%d"), "machine": describe(),
        "torch": torch.__version__, "train_rows": int(train_bytes // (2 * D)), "dim": D,
        "train_fp16_bytes": train_bytes, "ceiling_bytes": ceiling, "cache_seconds": round(made, 1),
        "crt_lws_epochs": epochs,
        "rerun_only": (reruns + [f"{time.strftime('%Y-%m-%d')}: {','.join(rerun)}"]) if rerun else None,
        "commands": results, "bare_products_s": round(bare, 1), "knn_ivf": knn,
        "knn_head_bytes": head.stat().st_size if head.exists() else None,
        "train_cache_bytes": (run / "features" / "train.h5").stat().st_size,
        "eval": json.loads((run / "reports" / "eval-test.json").read_text())["heads"] if (run / "reports" / "eval-test.json").exists() else None,
    }
    text = json.dumps(summary, indent=2, default=str)
    if a.out:
        a.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

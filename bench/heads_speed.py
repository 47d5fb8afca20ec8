"""Classifier-stage speed and memory at ImageNet-LT scale, on synthetic features.

Train 115,846 x 2048 (ImageNet-LT-like counts, 1280 down to 5 over 1,000 classes), val
20,000 (20 per class), stored float16. One run measures, against bare torch baselines:
  (a) tune-tau over 41 τ values vs one evaluation of one τ-norm head
  (b) cRT fit for E epochs vs the same number of bare forward + backward matrix products
  (c) NCM fit + predict vs a bare torch nearest-mean classifier
  (d) peak memory of a cRT fit vs the float16 train feature matrix + 1 GiB
Usage: python bench/heads_speed.py [--device cpu|cuda] [--scale 0.1] [--out results.json]
--scale shrinks the number of samples (not D or C) for quick runs."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ltcli import faiss_index  # noqa: E402
from ltcli.featureset import FeatureSet  # noqa: E402
from ltcli.heads import build_head  # noqa: E402

GIB = 1 << 30
C, D = 1000, 2048
N_TRAIN, N_MAX, N_MIN, VAL_PER_CLASS = 115_846, 1280, 5, 20


# ---- data --------------------------------------------------------------------------------
def imagenet_lt_counts(total: int = N_TRAIN, n_max: int = N_MAX, n_min: int = N_MIN, c: int = C) -> np.ndarray:
    """Counts falling from n_max to n_min: n_i = n_min·(n_max/n_min)^((1 - i/(C-1))^p), with p
    solved so they sum to `total` (p = 1 would be a plain exponential, too many images)."""
    x = np.arange(c) / (c - 1)

    def counts(p):
        return np.round(n_min * (n_max / n_min) ** ((1 - x) ** p)).astype(np.int64)

    lo, hi = 0.1, 20.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if counts(mid).sum() > total else (lo, mid)
    n = counts(hi)
    i = c // 2  # fix the rounding residue in the middle of the profile
    while n.sum() != total:
        n[i] += 1 if n.sum() < total else -1
        i += 1
    return -np.sort(-n)


def make_split(counts: np.ndarray, mu: torch.Tensor, gen: torch.Generator,
               step: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """float16 features mu[y] + noise, generated in chunks (no float32 copy of the whole)."""
    y = torch.repeat_interleave(torch.arange(len(counts)), torch.as_tensor(counts))
    y = y[torch.randperm(len(y), generator=gen)]
    x = torch.empty((len(y), mu.shape[1]), dtype=torch.float16)
    for s in range(0, len(y), step):
        yy = y[s : s + step]
        x[s : s + len(yy)] = (mu[yy] + torch.randn(len(yy), mu.shape[1], generator=gen)).to(torch.float16)
    return x, y


def make_data(scale: float, seed: int = 0, with_val: bool = True):
    gen = torch.Generator().manual_seed(seed)
    full = imagenet_lt_counts()
    counts = np.maximum(1, np.round(full * scale)).astype(np.int64)
    mu = torch.randn(C, D, generator=gen) * 0.12  # class separation: hard, but learnable
    n = torch.as_tensor(counts, dtype=torch.float32)
    # a biased, imperfect stage-1 classifier: noisy class directions whose norms and biases
    # grow with the class size, as in joint training
    noisy = mu + 0.12 * torch.randn(C, D, generator=gen)
    weight = torch.nn.functional.normalize(noisy, dim=1) * (n / n.max()).pow(0.5).unsqueeze(1) * 0.5
    bias = 0.5 * (n / n.max()).log()
    names = [f"c{i:04d}" for i in range(C)]
    xtr, ytr = make_split(counts, mu, gen)
    train = FeatureSet(xtr, ytr, weight, bias, names, torch.as_tensor(counts), "train", {"path": "synthetic-train"})
    val = None
    if with_val:
        vcount = np.full(C, max(1, round(VAL_PER_CLASS * scale)), dtype=np.int64)
        xva, yva = make_split(vcount, mu, gen)
        val = FeatureSet(xva, yva, weight, bias, names, torch.as_tensor(counts), "val", {"path": "synthetic-val"})
    return train, val


# ---- timing ------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int = 1, warmup: int = 0) -> tuple[float, object]:
    """Best wall time of `repeats` runs (after `warmup` untimed ones) and the last result."""
    out = None
    for _ in range(warmup):
        out = fn()
        sync(device)
    best = math.inf
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best, out


def top1_top5(scores: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    top5 = scores.topk(5, dim=1).indices
    return (top5[:, 0] == labels).float().mean().item(), (top5 == labels[:, None]).any(1).float().mean().item()


def evaluate(scores: torch.Tensor, fs: FeatureSet) -> dict:
    """One evaluation's metrics: ltcli.metrics.compute_metrics when present."""
    try:
        from ltcli.metrics import compute_metrics

        return compute_metrics(scores, fs.labels, fs.train_counts)
    except ImportError:
        t1, t5 = top1_top5(scores, fs.labels)
        return {"overall": t1, "top5": t5}


# ---- (a) τ sweep -------------------------------------------------------------------------
def local_tau_sweep(val: FeatureSet, taus, device: str) -> list[dict]:
    """Fallback: dot products once, then every τ only rescales columns (top-1 per τ)."""
    w = val.weight.to(device)
    logn = w.norm(dim=1).clamp_min(1e-12).log()
    scale = torch.exp(-torch.as_tensor(taus, device=device)[:, None] * logn[None])  # T x C
    y = val.labels.to(device)
    correct = torch.zeros(len(taus), device=device)
    for s in range(0, val.features.shape[0], 4096):
        dots = val.features[s : s + 4096].to(device, torch.float32) @ w.T
        pred = (dots[None] * scale[:, None, :]).argmax(-1)  # T x rows
        correct += (pred == y[s : s + 4096][None]).sum(1)
    acc = (correct / len(y)).tolist()
    return [{"tau": float(t), "overall": a} for t, a in zip(taus, acc)]


def bench_tau(train: FeatureSet, val: FeatureSet, device: str) -> dict:
    taus = [round(0.05 * i, 2) for i in range(41)]  # 0 : 2 : 0.05, the CLI's default grid

    def one_eval():
        head = build_head("tau-norm", tau=1.0).fit(train, device=device)
        return evaluate(head.logits_for(val, device=device), val)

    try:
        from ltcli.tune import tau_sweep

        def sweep():
            return tau_sweep(val.features, val.labels, val.weight, val.bias, val.train_counts, taus,
                             method="tau-norm", device=device)

        sweep()  # also checks the signature still matches
        impl = "ltcli.tune.tau_sweep"
    except (ImportError, TypeError):

        def sweep():
            return local_tau_sweep(val, taus, device)

        impl = "bench-local sweep"
    t_eval, metrics = timed(one_eval, device, repeats=3, warmup=1)
    t_sweep, rows = timed(sweep, device, repeats=3, warmup=1)
    best = max(rows, key=lambda r: r["overall"])
    return {
        "taus": len(taus), "sweep_impl": impl, "one_eval_s": t_eval, "sweep_s": t_sweep,
        "ratio": t_sweep / t_eval, "target": 1.5,
        "best_tau": best["tau"], "best_tau_top1": best["overall"],
        "tau1_top1": metrics.get("overall"),
    }


# ---- (b) cRT -----------------------------------------------------------------------------
def bare_matmuls(train: FeatureSet, steps: int, batch: int, device: str) -> float:
    """`steps` forward (x Wᵀ) + backward (gᵀ x) products on pre-made float32 batches."""
    g = torch.Generator().manual_seed(1)
    nb = max(1, min(8, train.features.shape[0] // batch))
    xs = [train.features[i * batch : (i + 1) * batch].to(device, torch.float32) for i in range(nb)]
    w = (torch.rand(C, D, generator=g) * 0.02 - 0.01).to(device)

    def run():
        for i in range(steps):
            x = xs[i % nb]
            z = x @ w.T
            w.sub_(torch.mm(z.t(), x), alpha=1e-9)  # keep the result live; tiny update
        return w

    t, _ = timed(run, device, repeats=1, warmup=0)
    return t


def bench_crt(train: FeatureSet, val: FeatureSet, device: str, epochs: int) -> dict:
    batch = 512
    steps = epochs * math.ceil(train.features.shape[0] / batch)
    build_head("crt", epochs=1).fit(  # warm-up: kernels, allocator, thread pools
        FeatureSet(train.features[:4096], train.labels[:4096], None, None, train.class_names,
                   train.train_counts, "train"), device=device)
    t_crt, head = timed(lambda: build_head("crt", epochs=epochs, batch_size=batch).fit(train, device=device), device)
    bare_matmuls(train, min(steps, 20), batch, device)  # warm-up
    t_bare = bare_matmuls(train, steps, batch, device)
    extra = {}
    if device.startswith("cuda"):
        # the bare products read features already on the GPU; so can cRT: time it that way
        # too, and the one-time host -> device copy (with its NaN check) on its own
        from ltcli.heads._balanced import DeviceRows

        t_copy, _ = timed(lambda: DeviceRows(train.features, torch.device(device), "bench"), device)
        on_dev = FeatureSet(train.features.to(device), train.labels, None, None, train.class_names,
                            train.train_counts, "train")
        t_dev, _ = timed(lambda: build_head("crt", epochs=epochs, batch_size=batch).fit(on_dev, device=device), device)
        del on_dev
        extra = {"host_to_device_copy_s": t_copy, "crt_fit_features_on_device_s": t_dev,
                 "ratio_features_on_device": t_dev / t_bare}
    joint = build_head("joint").fit(train)
    few = train.train_counts < 20
    accs = {}
    for name, h in (("joint", joint), ("crt", head)):
        pred = h.logits_for(val, device=device).argmax(1)
        per_class = torch.zeros(C).index_add_(0, val.labels, (pred == val.labels).float()) / torch.bincount(val.labels, minlength=C)
        accs[name] = {"top1": (pred == val.labels).float().mean().item(), "few": per_class[few].mean().item()}
    return {"epochs": epochs, "steps": steps, "batch": batch, "crt_fit_s": t_crt, "bare_s": t_bare,
            "ratio": t_crt / t_bare, "target": 2.0, **extra, "val": accs}


# ---- (c) NCM -----------------------------------------------------------------------------
def bare_ncm(train: FeatureSet, val: FeatureSet, device: str) -> torch.Tensor:
    """Centre, L2-normalise, class means by index_add, argmax of normalised dot products."""
    step = 8192
    total = torch.zeros(D, dtype=torch.float64, device=device)
    for s in range(0, train.features.shape[0], step):
        total += train.features[s : s + step].to(device, torch.float32).sum(0)
    mean = (total / train.features.shape[0]).float()
    sums = torch.zeros(C, D, device=device)
    for s in range(0, train.features.shape[0], step):
        x = torch.nn.functional.normalize(train.features[s : s + step].to(device, torch.float32) - mean, dim=1)
        sums.index_add_(0, train.labels[s : s + step].to(device), x)
    means = torch.nn.functional.normalize(sums, dim=1)
    preds = []
    for s in range(0, val.features.shape[0], step):
        q = torch.nn.functional.normalize(val.features[s : s + step].to(device, torch.float32) - mean, dim=1)
        preds.append((q @ means.T).argmax(1))
    return torch.cat(preds).cpu()


def bench_ncm(train: FeatureSet, val: FeatureSet, device: str) -> dict:
    faiss_gpu = faiss_index.num_gpus() > 0
    # compare like with like: the bare reference runs where the FAISS search runs
    bare_dev = device if (faiss_gpu or not device.startswith("cuda")) else "cpu"

    def ncm():
        return build_head("ncm").fit(train, device=device).logits_for(val, device=device).argmax(1)

    t_ncm, pred = timed(ncm, device, repeats=2, warmup=1)
    t_fit, head = timed(lambda: build_head("ncm").fit(train, device=device), device, repeats=2)
    t_pred, _ = timed(lambda: head.logits_for(val, device=device).argmax(1), device, repeats=2)
    t_bare, ref = timed(lambda: bare_ncm(train, val, bare_dev), bare_dev, repeats=2, warmup=1)
    out = {"faiss_backend": faiss_index.backend_name(), "ncm_s": t_ncm, "ncm_fit_s": t_fit,
           "ncm_predict_s": t_pred, "bare_device": bare_dev,
           "bare_s": t_bare, "ratio": t_ncm / t_bare, "target": 2.0,
           "agree": (pred == ref).float().mean().item(), "top1": (pred == val.labels).float().mean().item()}
    if bare_dev != device:  # also report the bare reference on the torch device
        out["bare_on_torch_device_s"], _ = timed(lambda: bare_ncm(train, val, device), device, repeats=2, warmup=1)
    return out


# ---- (d) memory --------------------------------------------------------------------------
def rss_peak_bytes() -> int:
    """Peak resident memory of this process. VmHWM, not ru_maxrss: after fork + exec Linux's
    ru_maxrss still carries the parent's peak, which would charge the child for it."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def memory_child(scale: float, device: str, epochs: int) -> dict:
    """Runs in a fresh process: train features only, then one cRT fit; peak RSS / device memory."""
    base = rss_peak_bytes()
    train, _ = make_data(scale, with_val=False)
    after_data = rss_peak_bytes()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    build_head("crt", epochs=epochs).fit(train, device=device)
    out = {"rss_before_data": base, "rss_after_data": after_data, "rss_peak": rss_peak_bytes(),
           "features_fp16_bytes": train.features.numel() * 2}
    if device.startswith("cuda"):
        out["cuda_peak_allocated"] = torch.cuda.max_memory_allocated()
    return out


def bench_memory(scale: float, device: str, epochs: int) -> dict:
    cmd = [sys.executable, __file__, "--memory-child", "--scale", str(scale), "--device", device,
           "--epochs", str(epochs)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    m = json.loads(res.stdout.strip().splitlines()[-1])
    budget = m["features_fp16_bytes"] + GIB
    m.update(epochs=epochs, budget=budget, rss_ok=m["rss_peak"] <= budget,
             rss_peak_above_interpreter=m["rss_peak"] - m["rss_before_data"])
    if "cuda_peak_allocated" in m:
        m["cuda_ok"] = m["cuda_peak_allocated"] <= budget
    return m


# ---- main --------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the samples (D and C stay)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--only", default="tau,crt,ncm,memory", help="comma-separated subset")
    ap.add_argument("--memory-epochs", type=int, default=1,
                    help="cRT epochs of the memory run (peak memory does not grow with epochs)")
    ap.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        print(json.dumps(memory_child(args.scale, args.device, args.epochs)))
        return

    only = set(args.only.split(","))
    info = {"device": args.device, "scale": args.scale, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "faiss": faiss_index.backend_name()}
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    t = time.perf_counter()
    train, val = make_data(args.scale)
    info.update(n_train=int(train.features.shape[0]), n_val=int(val.features.shape[0]), dim=D, classes=C,
                data_s=time.perf_counter() - t, counts_max=int(train.train_counts.max()),
                counts_min=int(train.train_counts.min()),
                many_medium_few=[int((train.train_counts > 100).sum()),
                                 int(((train.train_counts >= 20) & (train.train_counts <= 100)).sum()),
                                 int((train.train_counts < 20).sum())])
    print(f"data: train {info['n_train']:,} x {D}, val {info['n_val']:,}, {C} classes "
          f"({info['data_s']:.1f}s); {info['faiss']}; device {args.device}", flush=True)
    results = {"info": info}
    if "tau" in only:
        results["tau"] = r = bench_tau(train, val, args.device)
        print(f"(a) tune-tau {r['taus']} τ: {r['sweep_s']:.3f}s vs one eval {r['one_eval_s']:.3f}s "
              f"-> {r['ratio']:.2f}x (target <= 1.5) [{r['sweep_impl']}]", flush=True)
    if "crt" in only:
        results["crt"] = r = bench_crt(train, val, args.device, args.epochs)
        print(f"(b) cRT {r['epochs']} epochs ({r['steps']} steps): {r['crt_fit_s']:.2f}s vs bare "
              f"{r['bare_s']:.2f}s -> {r['ratio']:.2f}x (target <= 2); val {r['val']}", flush=True)
        if "crt_fit_features_on_device_s" in r:
            print(f"    features already on the GPU: {r['crt_fit_features_on_device_s']:.2f}s -> "
                  f"{r['ratio_features_on_device']:.2f}x; host->device copy alone {r['host_to_device_copy_s']:.2f}s",
                  flush=True)
    if "ncm" in only:
        results["ncm"] = r = bench_ncm(train, val, args.device)
        print(f"(c) NCM fit+predict: {r['ncm_s']:.3f}s (fit {r['ncm_fit_s']:.3f}, predict {r['ncm_predict_s']:.3f}) "
              f"vs bare torch ({r['bare_device']}) {r['bare_s']:.3f}s -> {r['ratio']:.2f}x (target <= 2); "
              f"agreement {r['agree']:.4f}", flush=True)
    del train, val
    if "memory" in only:
        results["memory"] = r = bench_memory(args.scale, args.device, args.memory_epochs)
        line = (f"(d) cRT peak RSS {r['rss_peak'] / GIB:.2f} GiB (interpreter {r['rss_before_data'] / GIB:.2f}) "
                f"vs budget {r['budget'] / GIB:.2f} GiB (fp16 features {r['features_fp16_bytes'] / GIB:.2f} + 1)")
        if "cuda_peak_allocated" in r:
            line += f"; CUDA peak allocated {r['cuda_peak_allocated'] / GIB:.2f} GiB"
        print(line, flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()

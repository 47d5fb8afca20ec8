"""`ltcli eval`: every head (or those named) on one split: top-1, top-5, macro, many / medium /
few; a JSON report, a per-class CSV and, with --plot, the per-class and weight-norm plots."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..cache import check_same_source, read_features
from ..console import err_console, progress_bar
from ..errors import LtcliError
from ..heads import HEADS, baseline_method, build_head, load_head, methods
from ..io import atomic_write_json
from ..metrics import check_scores, checked_labels, compute_metrics, label_ranks, metrics_table, write_per_class_csv
from ..options import Options, opt
from ..rundir import RunDir
from .common import input_path, log_event


@dataclass(kw_only=True)
class EvalOptions(Options):
    command = "eval"

    split: str = opt("test", str, "Split to evaluate on.")
    heads: list = opt([], list, "Heads to evaluate (names in RUN/heads or .pt paths; repeat or comma-separate). "
                      "Default: all, the baseline included.")
    features: str | None = opt(None, str, "Features of the split (default RUN/features/SPLIT.h5; '-' = stdin).",
                               optional=True)
    many: float = opt(100, float, "Many-shot: more than this many train images.", min=0.0)
    few: float = opt(20, float, "Few-shot: fewer than this many train images.", min=0.0)
    plot: bool = opt(False, bool, "Per-class accuracy against train count, and weight norms of linear heads (PNG).")
    out: Path | None = opt(None, Path, "Report folder (default RUN/reports).", optional=True)


def discover_heads(run: RunDir, names: list[str]) -> list[tuple[str, Path]]:
    """(name, path) of the heads to evaluate: the named ones (names or paths) or all in
    RUN/heads, in table order."""
    if names:
        found = []
        for item in names:
            p = Path(item)
            found.append((p.stem, p) if p.suffix == ".pt" or p.exists() else (item, run.head(item)))
        for name, p in found:
            if not p.exists():
                raise LtcliError(f"--heads {name}: {p} not found (fit it with `ltcli fit-head --method {name}`)")
        return found
    paths = sorted(run.heads_dir.glob("*.pt")) if run.heads_dir.is_dir() else []
    if not paths:
        raise LtcliError(f"{run.heads_dir}: no heads yet; fit some with `ltcli fit-head --run {run.root}`")
    rank = {name: i for i, name in enumerate(methods())}
    paths.sort(key=lambda p: (rank.get(p.stem, len(rank)), p.stem))
    return [(p.stem, p) for p in paths]


def check_head_matches(head_path, prov: dict, fs, features_path) -> None:
    """A head only applies to features from the backbone and classes it was fitted on."""
    check_same_source(str(head_path), prov, str(features_path), fs.attrs)
    if prov.get("feature_dim") not in (None, fs.dim):
        raise LtcliError(f"{head_path}: head expects D={prov['feature_dim']}, {features_path} has D={fs.dim}")
    if prov.get("num_classes") not in (None, fs.num_classes):
        raise LtcliError(f"{head_path}: head has {prov['num_classes']} classes, {features_path} has {fs.num_classes}")
    names = prov.get("class_names")
    if names is not None and list(names) != list(fs.class_names):
        j = next(i for i, (a, b) in enumerate(zip(names, fs.class_names)) if a != b)
        raise LtcliError(f"{head_path}: class {j} is '{names[j]}' in the head but '{fs.class_names[j]}' "
                         f"in {features_path}")


def _label_ranks(head, fs, features_path, progress=None) -> torch.Tensor:
    """The rank of each true label under the head's scores, chunk by chunk: the N x C score
    matrix is never held (0.8 GB per head at iNaturalist's 8,142 classes)."""
    labels = checked_labels(fs.labels, fs.num_classes)
    ranks = torch.empty(labels.shape[0], dtype=torch.int64)
    for start, scores in head.iter_logits(fs.features, source=str(features_path), progress=progress):
        check_scores(scores)
        stop = start + scores.shape[0]
        ranks[start:stop] = label_ranks(scores, labels[start:stop])
    return ranks


def _head_result(name: str, head, prov: dict, path, fs, opts: EvalOptions, features_path, progress=None) -> dict:
    ranks = _label_ranks(head, fs, features_path, progress)
    m = compute_metrics(None, fs.labels, fs.train_counts, many=opts.many, few=opts.few, ranks=ranks)
    m["head_file"] = str(path) if path is not None else None
    m["method"] = getattr(head, "method", name)
    if "tau" in (prov.get("options") or {}):
        m["tau"] = prov["options"]["tau"]
    if prov.get("tuned_on"):
        m["tuned_on"] = prov["tuned_on"]
    return m


def _heads_to_score(opts: EvalOptions, run_dir: RunDir, fs):
    """(name, head, provenance, path) for each head, head and provenance None until loaded; the
    baseline joins from the features' stage-1 classifier when the run has not fitted it (every
    comparison needs it)."""
    found = discover_heads(run_dir, [n.strip() for item in opts.heads for n in item.split(",") if n.strip()])
    out = [(name, None, None, path) for name, path in found]  # loaded one at a time: see _run
    base = baseline_method()
    if not opts.heads and base not in {n for n, *_ in out} and fs.weight is not None:
        head = build_head(base).fit(fs, device="cpu")
        out.insert(0, (base, head, {"stage1": fs.attrs.get("stage1")}, None))
    return out


def run(opts: EvalOptions, run_dir: RunDir) -> dict:
    """Evaluate every head on one split; write the JSON report, per-class CSV and plots."""
    features_path = input_path(opts.features, "--features", run_dir.features(opts.split))  # stdin first
    with run_dir.writing() if opts.out is None else contextlib.nullcontext():
        return _run(opts, run_dir, features_path)


def _run(opts: EvalOptions, run_dir: RunDir, features_path: Path) -> dict:
    report_dir = Path(opts.out or run_dir.reports)
    fs = read_features(features_path, mmap=True)
    if len(fs.labels) == 0:
        raise LtcliError(f"{features_path}: holds no samples to evaluate")
    results: dict[str, dict] = {}
    norms: dict[str, Any] = {}
    heads = _heads_to_score(opts, run_dir, fs)
    with progress_bar() as bar:
        task = bar.add_task("eval", total=len(heads), rate="")
        rows = bar.add_task("rows", total=1, rate="")
        for name, head, prov, path in heads:
            if head is None:  # one head in memory at a time (each is C x D: 67 MB at iNat size)
                head, prov = load_head(path)
            if path is not None:
                check_head_matches(path, prov, fs, features_path)
            bar.update(task, description=f"eval {name}")
            bar.reset(rows, total=1, description=f"  {name}")
            results[name] = _head_result(name, head, prov, path, fs, opts, features_path,
                                         progress=lambda done, total: bar.update(rows, completed=done, total=total))
            if HEADS.get(results[name]["method"]) is not None and HEADS[results[name]["method"]].shows_weight_norms:
                n = head.weight_norms()
                if n is not None:
                    norms[name] = torch.as_tensor(n).float().numpy()
            bar.advance(task)
    title = f"{fs.split} split: {len(fs.labels):,} images, {fs.num_classes} classes"
    err_console.print(metrics_table(results, title=title))
    for name, m in results.items():
        if m.get("tuned_on") == "test":
            err_console.print(f"[yellow]note: {name} had τ tuned on the test split (optimistic)[/yellow]")
    summary, written = _write_report(report_dir, fs, features_path, results, norms, opts)
    log_event(run_dir, {"event": "eval", "split": fs.split,
                        "heads": {n: {k: m[k] for k in ("overall", "macro", "many", "medium", "few")}
                                  for n, m in results.items()}})
    return {"summary": summary, "paths": written, "results": results}


def _write_report(report_dir: Path, fs, features_path, results, norms, opts) -> tuple[dict, list[Path]]:
    try:
        report_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LtcliError(f"{report_dir}: cannot create the report folder ({exc.strerror or exc})") from None
    json_path = report_dir / f"eval-{fs.split}.json"
    summary = {
        "split": fs.split, "features": str(features_path), "class_names": list(fs.class_names),
        "thresholds": {"many": opts.many, "few": opts.few},
        "heads": {name: {k: v for k, v in m.items() if k != "per_class"} for name, m in results.items()},
        "per_class": {name: m["per_class"] for name, m in results.items()},
    }
    atomic_write_json(json_path, summary)
    csv_path = report_dir / f"eval-{fs.split}-per-class.csv"
    write_per_class_csv(csv_path, results, fs.class_names)
    written = [json_path, csv_path]
    if opts.plot:
        from ..plots import plot_per_class_accuracy, plot_weight_norms

        png = report_dir / f"per-class-{fs.split}.png"
        plot_per_class_accuracy(results, fs.train_counts.numpy(), png, many=opts.many, few=opts.few)
        written.append(png)
        if norms:
            png2 = report_dir / "weight-norms.png"
            plot_weight_norms(norms, fs.train_counts.numpy(), png2)
            written.append(png2)
    return summary, written

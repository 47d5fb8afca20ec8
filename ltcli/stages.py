"""The classifier-stage jobs behind `fit-head`, `tune-tau` and `eval`.

Each works on cached features only (never the backbone), so every call costs seconds.
Paths come either from a run directory or from explicit overrides.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import torch

from .console import err_console
from .errors import LtcliError, check_seed
from .evaluate import compute_metrics, metrics_table, write_per_class_csv
from .features import check_compatible, check_same_source, read_features
from .heads import build_head, load_head, save_head
from .io import atomic_write_json
from .rundir import RunDir

# the order heads appear in tables: the paper's, then the post-hoc extras
HEAD_ORDER = ["joint", "ncm", "crt", "tau-norm", "lws", "logit-adjust", "knn"]
LINEAR_HEADS = {"joint", "crt", "tau-norm", "lws"}


# which fit-head options each method takes (anything else is a usage error, not ignored)
METHOD_OPTIONS = {
    "joint": set(),
    "crt": {"epochs", "lr", "batch_size", "weight_decay", "momentum", "seed", "device"},
    "lws": {"epochs", "lr", "batch_size", "weight_decay", "momentum", "seed", "device"},
    "tau-norm": {"tau", "keep_bias"},
    "logit-adjust": {"tau"},
    "ncm": {"metric"},
    "knn": {"metric", "k", "weighting"},
}


def head_options(method: str, given: dict) -> dict:
    """Check that every given option applies to `method`; return them as head options."""
    if method not in METHOD_OPTIONS:
        raise LtcliError(f"--method {method}: unknown head (choose {', '.join(METHOD_OPTIONS)})")
    for key in given:
        if key not in METHOD_OPTIONS[method]:
            users = [m for m, opts in METHOD_OPTIONS.items() if key in opts]
            flag = "--" + key.replace("_", "-")
            raise LtcliError(f"{flag}: does not apply to --method {method} (only to {', '.join(users)})")
    if "weighting" in given and given["weighting"] not in ("distance", "count"):
        raise LtcliError(f"--weighting {given['weighting']}: choose distance or count")
    if "metric" in given and given["metric"] not in ("cosine", "euclidean"):
        raise LtcliError(f"--metric {given['metric']}: choose cosine or euclidean")
    for key in ("epochs", "batch_size", "k"):
        if key in given and given[key] < 1:
            raise LtcliError(f"--{key.replace('_', '-')} {given[key]}: must be at least 1")
    for key in ("lr",):
        if key in given and not given[key] > 0:
            raise LtcliError(f"--lr {given[key]}: must be positive")
    if "seed" in given:
        check_seed(given["seed"])
    if "tau" in given and not (math.isfinite(given["tau"]) and given["tau"] >= 0):
        raise LtcliError(f"--tau {given['tau']}: must be a finite number >= 0")
    return dict(given)


def _provenance(fs, features_path: Path, extra: dict | None = None) -> dict:
    prov = {
        "features": str(features_path),
        "backbone_sha256": fs.attrs.get("backbone_sha256"),
        "dataset_id": fs.attrs.get("dataset_id"),
        "class_names": list(fs.class_names),
        "feature_dim": fs.dim,
        "num_classes": fs.num_classes,
    }
    prov.update(extra or {})
    return prov


def _log(run: RunDir | None, event: dict) -> None:
    if run is not None and run.root.exists():
        run.log_event(event)


def fit_head(features_path: Path, method: str, out_path: Path, options: dict, run: RunDir | None = None) -> Path:
    """Fit one head on train features and save it atomically."""
    fs = read_features(features_path, mmap=True)  # float16 pages, no float32 copy of N x D
    if fs.split != "train":
        raise LtcliError(
            f"{features_path}: holds the '{fs.split}' split; heads are fitted on train features "
            "(tune τ on val with `ltcli tune-tau`)"
        )
    head = build_head(method, **options)
    head.fit(fs)
    _check_fitted_finite(head, method, options, features_path)
    save_head(head, out_path, _provenance(fs, features_path, {"method": method, "options": options}))
    _log(run, {"event": "fit-head", "method": method, "head": str(out_path), "options": options})
    return out_path


def _check_fitted_finite(head, method: str, options: dict, features_path: Path) -> None:
    """A diverged fit (e.g. a huge --lr) must not be saved as a head that no stage can load."""
    for key, value in head.state().items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            if method in ("crt", "lws"):
                raise LtcliError(f"--lr {options.get('lr', 'default')}: {method} training diverged ('{key}' became "
                                 "NaN or inf); use a smaller --lr")
            raise LtcliError(f"{features_path}: fitting {method} gave NaN or inf in '{key}'")


def tune_tau(
    split_path: Path,
    train_path: Path | None,
    method: str,
    taus: Sequence[float],
    metric: str,
    keep_bias: bool,
    out_path: Path,
    report_dir: Path | None,
    plot: bool,
    allow_test: bool,
    many: float,
    few: float,
    run: RunDir | None = None,
) -> dict:
    """Sweep τ on a held-out split, pick the best by `metric`, write the head with that τ."""
    from .tune import grid_edge_note, pick_best, tau_sweep, tau_table

    fs = read_features(split_path)
    if fs.split == "train":
        raise LtcliError(f"{split_path}: τ must be chosen on held-out data, not the train split (use --split val)")
    if fs.split == "test" and not allow_test:
        raise LtcliError(
            f"{split_path}: tuning τ on the test split reports an optimistic test accuracy; "
            "use --split val (hold one out with train-backbone --val-per-class K) or pass --allow-test"
        )
    source = fs
    if train_path is not None and Path(train_path).exists():
        source = read_features(train_path)
        check_compatible(source, fs)
    if fs.weight is None:
        raise LtcliError(f"{split_path}: holds no stage-1 classifier (/classifier/weight)")
    rows = tau_sweep(fs.features if fs.views == 1 else fs.features[:, 0], fs.labels, fs.weight, fs.bias,
                     fs.train_counts, taus, method=method, keep_bias=keep_bias, many=many, few=few)
    best = pick_best(rows, metric)
    title = f"{method} τ search on {fs.split} (pick by {metric})"
    if fs.split == "test":
        title += "  [TUNED ON TEST: optimistic]"
    err_console.print(tau_table(rows, best["tau"], title=title))
    err_console.print(f"best τ = {best['tau']:g}  ({metric} {100 * best[metric]:.2f}%)", highlight=False)
    edge = grid_edge_note(rows, metric)
    if edge:
        err_console.print(f"[yellow]note:[/yellow] {edge}", highlight=False)

    options = {"tau": best["tau"]}
    if method == "tau-norm":
        options["keep_bias"] = keep_bias
    head = build_head(method, **options)
    head.fit(source)
    extra = {"method": method, "options": options, "tuned_on": fs.split, "tuned_file": str(split_path),
             "metric": metric, "grid": list(map(float, taus)), "sweep": rows, "tuned_on_test": fs.split == "test"}
    save_head(head, out_path, _provenance(source, Path(train_path or split_path), extra))
    written = [out_path]
    if report_dir is not None:
        report = report_dir / f"tune-{method}-{fs.split}.json"
        atomic_write_json(report, {"method": method, "split": fs.split, "metric": metric, "best": best,
                                   "rows": rows, "tuned_on_test": fs.split == "test"})
        written.append(report)
        if plot:
            from .plots import plot_tau_curve

            png = report_dir / f"tune-{method}-{fs.split}.png"
            plot_tau_curve(rows, best["tau"], png, title=title)
            written.append(png)
    _log(run, {"event": "tune-tau", "method": method, "split": fs.split, "best_tau": best["tau"],
               "metric": metric, "value": best[metric]})
    return {"best": best, "rows": rows, "paths": written}


def discover_heads(run: RunDir, names: Sequence[str] | None) -> list[tuple[str, Path]]:
    """(name, path) of the heads to evaluate: the named ones (names or paths) or all in run/heads."""
    if names:
        found = []
        for item in names:
            p = Path(item)
            if p.suffix == ".pt" or p.exists():
                found.append((p.stem, p))
            else:
                found.append((item, run.head(item)))
        for name, p in found:
            if not p.exists():
                raise LtcliError(f"--heads {name}: {p} not found (fit it with `ltcli fit-head --method {name}`)")
        return found
    if not run.heads_dir.exists():
        raise LtcliError(f"{run.heads_dir}: no heads yet; fit some with `ltcli fit-head --run {run.root}`")
    paths = sorted(run.heads_dir.glob("*.pt"))
    if not paths:
        raise LtcliError(f"{run.heads_dir}: no heads yet; fit some with `ltcli fit-head --run {run.root}`")
    rank = {name: i for i, name in enumerate(HEAD_ORDER)}
    paths.sort(key=lambda p: (rank.get(p.stem, len(rank)), p.stem))
    return [(p.stem, p) for p in paths]


def head_weight_norms(head) -> Any:
    """Per-class norm of a linear head's effective classifier weight (None if not linear)."""
    fn = getattr(head, "weight_norms", None)
    if fn is None:
        return None
    norms = fn()
    return None if norms is None else torch.as_tensor(norms).float().numpy()


def evaluate_heads(
    features_path: Path,
    heads: list[tuple[str, Path]],
    report_dir: Path,
    many: float,
    few: float,
    plot: bool,
    run: RunDir | None = None,
) -> dict:
    """Evaluate every head on one split; write the JSON report, per-class CSV and plots."""
    fs = read_features(features_path, mmap=True)
    if len(fs.labels) == 0:
        raise LtcliError(f"{features_path}: holds no samples to evaluate")
    feats = fs.features  # heads average stored views themselves
    results: dict[str, dict] = {}
    norms: dict[str, Any] = {}
    for name, path in heads:
        head, prov = load_head(path)
        _check_head_matches(path, prov, fs, features_path)
        scores = head.logits(feats, source=str(features_path))
        m = compute_metrics(scores, fs.labels, fs.train_counts, many=many, few=few)
        m["head_file"] = str(path)
        m["method"] = getattr(head, "method", name)
        if "tau" in (prov.get("options") or {}):
            m["tau"] = prov["options"]["tau"]
        if prov.get("tuned_on"):
            m["tuned_on"] = prov["tuned_on"]
        results[name] = m
        if name in LINEAR_HEADS or getattr(head, "method", "") in LINEAR_HEADS:
            n = head_weight_norms(head)
            if n is not None:
                norms[name] = n
    title = f"{fs.split} split: {len(fs.labels):,} images, {fs.num_classes} classes"
    err_console.print(metrics_table(results, title=title))
    for name, m in results.items():
        if m.get("tuned_on") == "test":
            err_console.print(f"[yellow]note: {name} had τ tuned on the test split (optimistic)[/yellow]")

    try:
        report_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LtcliError(f"{report_dir}: cannot create the report folder ({exc.strerror or exc})") from None
    json_path = report_dir / f"eval-{fs.split}.json"
    summary = {
        "split": fs.split, "features": str(features_path), "class_names": list(fs.class_names),
        "thresholds": {"many": many, "few": few},
        "heads": {name: {k: v for k, v in m.items() if k != "per_class"} for name, m in results.items()},
        "per_class": {name: m["per_class"] for name, m in results.items()},
    }
    atomic_write_json(json_path, summary)
    csv_path = report_dir / f"eval-{fs.split}-per-class.csv"
    write_per_class_csv(csv_path, results, fs.class_names)
    written = [json_path, csv_path]
    if plot:
        from .plots import plot_per_class_accuracy, plot_weight_norms

        png = report_dir / f"per-class-{fs.split}.png"
        plot_per_class_accuracy(results, fs.train_counts.numpy(), png, many=many, few=few)
        written.append(png)
        if norms:
            png2 = report_dir / "weight-norms.png"
            plot_weight_norms(norms, fs.train_counts.numpy(), png2)
            written.append(png2)
    _log(run, {"event": "eval", "split": fs.split,
               "heads": {n: {k: m[k] for k in ("overall", "macro", "many", "medium", "few")}
                         for n, m in results.items()}})
    return {"summary": summary, "paths": written, "results": results}


def _check_head_matches(head_path: Path, prov: dict, fs, features_path: Path) -> None:
    """A head only applies to features from the backbone and classes it was fitted on."""
    check_same_source(str(head_path), prov, str(features_path), fs.attrs)
    if prov.get("feature_dim") not in (None, fs.dim):
        raise LtcliError(f"{head_path}: head expects D={prov['feature_dim']}, {features_path} has D={fs.dim}")
    if prov.get("num_classes") not in (None, fs.num_classes):
        raise LtcliError(
            f"{head_path}: head has {prov['num_classes']} classes, {features_path} has {fs.num_classes}"
        )


# --- extract: the backbone runs once per split -------------------------------------------------


def _run_data_config(info: dict, data_override: str | None, skip_bad: bool | None):
    from .data import DataConfig

    fields = dict(info.get("data") or {})
    known = set(DataConfig.__dataclass_fields__)
    cfg = DataConfig(**{k: v for k, v in fields.items() if k in known})
    if data_override:
        cfg.spec = data_override
    if skip_bad is not None:
        cfg.skip_bad_images = skip_bad
    return cfg


def extract_splits(run: RunDir, splits: Sequence[str], *, checkpoint: Path | None, data: str | None,
                   out: Path | None, options: dict) -> list[Path]:
    """Run the stage-1 backbone over each split once and cache the features (HDF5)."""
    from .data import load_dataset
    from .extract import extract_split
    from .rundir import dataset_id as make_dataset_id, file_sha256
    from .train import SMALL_IMAGE_MAX, init_distributed, load_backbone, model_from_checkpoint, resolve_device

    check_seed(options.get("seed") or 0)
    if int(options.get("workers") or 0) < 0:
        raise LtcliError(f"--workers {options['workers']}: must be >= 0")
    if out is not None and len(splits) != 1:
        raise LtcliError("--out: give exactly one --split when naming the output file")
    ckpt_path = Path(checkpoint or run.backbone)
    if not ckpt_path.exists():
        raise LtcliError(f"{ckpt_path}: checkpoint not found; run `ltcli train-backbone --run {run.root}` "
                         "first or pass --checkpoint")
    info = run.read()
    ckpt = load_backbone(ckpt_path)
    if int(ckpt["num_classes"]) != len(info["class_names"]):
        raise LtcliError(f"{ckpt_path}: checkpoint has {ckpt['num_classes']} classes, "
                         f"{run.run_json} has {len(info['class_names'])}")
    device = resolve_device(options.pop("device", "auto"))
    dist_info = init_distributed(str(device))
    if dist_info.enabled and device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)
    data_cfg = _run_data_config(info, data, options.pop("skip_bad", None))
    dataset = load_dataset(data_cfg)
    if list(dataset.class_names) != list(info["class_names"]):
        raise LtcliError(f"--data {data or info['data']['spec']}: its classes differ from the run's "
                         f"({len(dataset.class_names)} vs {len(info['class_names'])} classes, or other names)")
    train_fp = dataset.split("train").fingerprint() if "train" in dataset.splits else None
    if train_fp == info.get("fingerprints", {}).get("train"):
        data_id = info["dataset_id"]
    else:  # another dataset with the same classes: its files must not mix with the run's
        data_id = make_dataset_id(data or "", info["class_names"], info["train_counts"], train_fp or "")
    sha = file_sha256(ckpt_path)
    model = model_from_checkpoint(ckpt, ckpt_path)  # one model serves every split
    train_size = info.get("image_size") or (info.get("train_config") or {}).get("image_size")
    written = []
    for name in splits:
        split = dataset.split(name)
        path = Path(out or run.features(name))
        extract_split(
            model, split, path, backbone_sha256=sha, class_names=info["class_names"],
            train_counts=info["train_counts"], dataset_id=data_id, arch=ckpt["arch"], device=device,
            size=options.get("size") or train_size, progress=dist_info.is_main,
            small=split.images is not None or bool(train_size and train_size <= SMALL_IMAGE_MAX),
            skip_bad=data_cfg.skip_bad_images,
            **{k: v for k, v in options.items() if k != "size"},
        )
        written.append(path)
        if dist_info.is_main and run.root.exists() and out is None:
            run.log_event({"event": "extract", "split": name, "features": str(path), "rows": len(split)})
    if dist_info.enabled:  # a clean exit under torchrun (gloo can abort at interpreter exit otherwise)
        torch.distributed.destroy_process_group()
    return written


# --- predict: label new images with backbone + head -------------------------------------------------


def predict_images(run: RunDir, head_path: Path, inputs: Sequence[str], *, checkpoint: Path | None,
                   top_k: int, device_name: str, batch_size: int = 256) -> list[dict]:
    """Top-k labels and scores for image files (or every image under given folders)."""
    import numpy as np

    from .data import IMAGE_EXTENSIONS, Split, decode_split
    from .rundir import file_sha256
    from .train import SMALL_IMAGE_MAX, load_backbone, model_from_checkpoint, resolve_device
    from .transforms import normalize_batch, test_resize, test_transform

    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files += sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_EXTENSIONS)
        elif p.exists():
            files.append(p)
        else:
            raise LtcliError(f"{p}: no such image or folder")
    if not inputs:
        raise LtcliError("-: stdin held no image paths")
    if not files:
        raise LtcliError(f"{', '.join(inputs)}: no images found")
    info = run.read()
    ckpt_path = Path(checkpoint or run.backbone)
    ckpt = load_backbone(ckpt_path)
    head, prov = load_head(head_path)
    if prov.get("backbone_sha256") and prov["backbone_sha256"] != file_sha256(ckpt_path):
        raise LtcliError(f"{head_path} was fitted on features of another backbone than {ckpt_path}")
    device = resolve_device(device_name)
    model = model_from_checkpoint(ckpt, ckpt_path).to(device).eval()
    native = info.get("image_size") or (info.get("train_config") or {}).get("image_size")
    size = native if native and native <= SMALL_IMAGE_MAX else 224
    tf = test_transform(size) if size > SMALL_IMAGE_MAX else None
    draft = test_resize(size)  # big JPEGs decode at reduced scale, as in extract
    names = info["class_names"]
    k = max(1, min(top_k, len(names)))
    # the images go through the same loading (and error messages) as training and extraction
    split = Split("predict", np.zeros(len(files), dtype=np.int64), paths=[str(f) for f in files])
    small = tf is None
    decoded = decode_split(split, size)[0] if small else None
    results = []
    for start in range(0, len(files), batch_size):
        rows = range(start, min(start + batch_size, len(files)))
        chunk = files[rows.start:rows.stop]
        if small:
            x = normalize_batch(decoded[rows.start:rows.stop].to(device))
        else:
            x = torch.stack([tf(split.load(i, draft=draft)) for i in rows]).to(device)
        with torch.no_grad():
            feats = model.features(x).float().cpu()
        probs = torch.softmax(head.logits(feats).float(), dim=1)
        top = probs.topk(k, dim=1)
        for f, scores, idx in zip(chunk, top.values.tolist(), top.indices.tolist()):
            results.append({"path": str(f), "labels": [names[i] for i in idx],
                            "scores": [round(s, 6) for s in scores]})
    return results

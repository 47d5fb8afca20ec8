"""The `ltcli` command line: thin wrappers that parse options and call the stage modules.

Conventions (design.md section 2): stdout carries only the path(s) a command wrote, one per
line (or one JSON object with --json); progress, tables and logs go to stderr. Exit codes:
0 ok, 1 the job failed, 2 bad usage or input (one line naming the culprit).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

try:  # typer >= 0.2x vendors click; older releases use the click package
    from typer.exceptions import Abort as _Abort, Exit as _Exit, TyperException as _UsageBase
except ImportError:  # pragma: no cover - depends on the installed typer
    from click.exceptions import Abort as _Abort, ClickException as _UsageBase, Exit as _Exit

from . import __version__
from .errors import JobFailed, LtcliError

app = typer.Typer(
    name="ltcli",
    help=(
        "Long-tailed recognition by decoupling representation and classifier "
        "(Kang et al., ICLR 2020).\n\n"
        "Train a backbone once, cache its features once, then fit and compare every "
        "classifier-rebalancing method (cRT, LWS, tau-norm, NCM, logit adjustment, kNN) in seconds, "
        "per many / medium / few-shot group.\n\n"
        "Pipeline: train-backbone -> extract -> fit-head / tune-tau -> eval.  "
        "`ltcli quickstart` runs all of it on a built-in synthetic long-tailed dataset."
    ),
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_DEBUG = {"on": bool(os.environ.get("LTCLI_DEBUG"))}

RUN_HELP = "Run directory holding run.json, backbone.pt, features/, heads/, reports/."
JSON_HELP = "Print one JSON object on stdout instead of paths."
DEVICE_HELP = "auto (CUDA if available), cpu or cuda."


def _version(value: bool):
    if value:
        typer.echo(f"ltcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
):
    if debug:
        _DEBUG["on"] = True


def emit(paths: list, as_json: bool, payload: Optional[dict] = None) -> None:
    """stdout: one path per line, or a single JSON object."""
    if as_json:
        typer.echo(json.dumps(payload if payload is not None else {"paths": [str(p) for p in paths]}, default=str))
    else:
        for p in paths:
            typer.echo(str(p))


# --- shared option groups -----------------------------------------------------------------------

def _data_config(data, seed, imbalance_factor, val_per_class, skip_bad_images, allow_outside_root,
                 synthetic_classes, synthetic_size):
    from .data import DataConfig

    kwargs = dict(spec=data, seed=seed, imbalance_factor=imbalance_factor, val_per_class=val_per_class,
                  skip_bad_images=skip_bad_images, allow_outside_root=allow_outside_root)
    if synthetic_classes is not None:
        kwargs["num_classes"] = synthetic_classes
    if synthetic_size is not None:
        kwargs["image_size"] = synthetic_size
    return DataConfig(**kwargs)


DATA_HELP = (
    "Dataset: synthetic (built-in), imagefolder:ROOT, list:ROOT:TRAIN.txt[,VAL.txt[,TEST.txt]], "
    "inat:ROOT, cifar10, cifar100."
)


@app.command("train-backbone")
def train_backbone_cmd(
    run: Path = typer.Option(Path("ltcli-run"), "--run", help=RUN_HELP),
    data: str = typer.Option("synthetic", "--data", help=DATA_HELP),
    imbalance_factor: Optional[float] = typer.Option(
        None, "--imbalance-factor", help="Subsample train to n_i = n_max * IF^(-i/(C-1)) (IF >= 1)."),
    val_per_class: int = typer.Option(0, "--val-per-class", help="Hold out K images per class as a balanced val split (before subsampling)."),
    arch: str = typer.Option("resnet8", "--arch", help="resnet8/20/32/44/56/110 (CIFAR-size), resnet10, or any torchvision.models name (`ltcli archs`)."),
    weights: Optional[str] = typer.Option(None, "--weights", help="torchvision weight name, e.g. IMAGENET1K_V1."),
    sampling: str = typer.Option("instance", "--sampling", help="instance | class | sqrt | progressive."),
    sampling_q: Optional[float] = typer.Option(None, "--sampling-q", help="General p_j ∝ n_j^q (overrides --sampling's q)."),
    epochs: int = typer.Option(30, "--epochs", help="Passes over the train split (CIFAR-LT recipe: 200; ImageNet-LT: 90)."),
    batch_size: int = typer.Option(128, "--batch-size", help="Global batch (split across DDP ranks)."),
    lr: float = typer.Option(0.1, "--lr", help="Peak learning rate (linear warm-up, then cosine to 0)."),
    momentum: float = typer.Option(0.9, "--momentum", help="SGD momentum."),
    weight_decay: float = typer.Option(5e-4, "--weight-decay", help="L2 penalty on every parameter, BN and biases included, as in the reference code (CIFAR-LT recipe: 2e-4)."),
    warmup_epochs: int = typer.Option(5, "--warmup-epochs", help="Epochs of linear learning-rate warm-up."),
    seed: int = typer.Option(0, "--seed", help="Seeds data selection, init, sampling and augmentation."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    amp: str = typer.Option("auto", "--amp", help="auto (bf16 on CUDA), bf16 or off."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Training size (default: native for small images, 224 otherwise)."),
    workers: int = typer.Option(4, "--workers", help="Decode / loader worker processes."),
    skip_bad_images: bool = typer.Option(False, "--skip-bad-images", help="Skip unreadable images (recorded in run.json) instead of failing."),
    allow_outside_root: bool = typer.Option(False, "--allow-outside-root", help="Let list-file paths point outside ROOT."),
    synthetic_classes: Optional[int] = typer.Option(None, "--synthetic-classes", help="Classes of the synthetic dataset."),
    synthetic_size: Optional[int] = typer.Option(None, "--synthetic-size", help="Image side of the synthetic dataset."),
    compile_model: bool = typer.Option(False, "--compile", help="torch.compile the train step (CUDA graphs on GPU; pays off for small nets)."),
    mixup: float = typer.Option(0.0, "--mixup", help="Mixup with λ ~ Beta(α, α) per batch (0 = off; MiSLAS: 1.0). Keeps the backbone from memorising train, so cRT / LWS have something to learn."),
    cutmix: float = typer.Option(0.0, "--cutmix", help="CutMix with λ ~ Beta(α, α) per batch (0 = off)."),
    mix_switch_prob: float = typer.Option(0.5, "--mix-switch-prob", help="With --mixup and --cutmix: probability that a batch uses cutmix."),
    mixup_off_epochs: int = typer.Option(0, "--mixup-off-epochs", help="Train the last N epochs without mixing (Bag of Tricks)."),
    label_smoothing: float = typer.Option(0.0, "--label-smoothing", help="Label smoothing ε of the stage-1 loss."),
    loss: str = typer.Option("ce", "--loss", help="ce, or balanced-softmax (cross-entropy on logits + log prior: logit-adjusted training, τ = 1)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from backbone-last.pt (same configuration)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace another run's files in --run."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
):
    """Stage 1: train a backbone + joint classifier on the (long-tailed) train split.

    Writes run.json, backbone.pt, backbone-last.pt (every epoch, for --resume) and metrics.jsonl.
    Under torchrun it trains with DDP: `torchrun --nproc-per-node N -m ltcli -- train-backbone ...`
    (the `--` keeps torchrun from taking `--run` for its own `--run-path`).
    """
    from .rundir import RunDir
    from .train import TrainConfig, train_backbone

    cfg = TrainConfig(
        data=_data_config(data, seed, imbalance_factor, val_per_class, skip_bad_images, allow_outside_root,
                          synthetic_classes, synthetic_size),
        arch=arch, weights=weights, sampling=sampling, sampling_q=sampling_q, epochs=epochs,
        batch_size=batch_size, lr=lr, momentum=momentum, weight_decay=weight_decay,
        warmup_epochs=warmup_epochs, seed=seed, device=device, amp=amp, image_size=image_size,
        workers=workers, compile=compile_model, mixup=mixup, cutmix=cutmix, mix_switch_prob=mix_switch_prob,
        mixup_off_epochs=mixup_off_epochs, label_smoothing=label_smoothing, loss=loss,
    )
    result = train_backbone(cfg, RunDir(run), resume=resume, overwrite=overwrite)
    if int(os.environ.get("RANK", "0")) == 0:
        emit([result["backbone"]], as_json, {"backbone": result["backbone"], "run": result["run"],
                                             "epochs": result["history"]})


METHOD_HELP = "joint | crt | lws | tau-norm | ncm | logit-adjust | knn."


def _read_stdin_path(value: Optional[str], what: str) -> Optional[str]:
    from .io import read_path_arg

    return None if value is None else read_path_arg(value, what)


@app.command("extract")
def extract_cmd(
    run: Path = typer.Option(Path("ltcli-run"), "--run", help=RUN_HELP),
    split: List[str] = typer.Option(["train"], "--split", help="train, val or test (repeat for several; 'all' for every split the data has)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Backbone checkpoint (default RUN/backbone.pt)."),
    data: Optional[str] = typer.Option(None, "--data", help="Override the data spec recorded in run.json (same classes)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output .h5 (one --split only; default RUN/features/SPLIT.h5)."),
    dtype: str = typer.Option("float16", "--dtype", help="float16 (default) or float32."),
    views: int = typer.Option(1, "--views", help="K seeded augmented views per image (for cRT / LWS on augmented features)."),
    batch_size: int = typer.Option(256, "--batch-size", help="Images per forward; a resumed file keeps the batch size it started with."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    amp: str = typer.Option("auto", "--amp", help="auto (bf16 on CUDA), bf16 or off."),
    workers: int = typer.Option(4, "--workers", help="Decode / loader worker processes."),
    gpu_decode: bool = typer.Option(False, "--gpu-decode", help="Decode JPEGs on the GPU (ImageNet-sized data)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the augmented views."),
    skip_bad_images: Optional[bool] = typer.Option(None, "--skip-bad-images/--no-skip-bad-images", help="Skip unreadable images (default: as in run.json)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Rewrite a complete file instead of reusing it."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
):
    """Run the backbone once over a split and cache its features in HDF5.

    Resumable (rerun the same command after a crash), reused when complete, refused when it
    would mix backbones. Prints the .h5 path(s) on stdout. Under torchrun the split is sharded:
    `torchrun --nproc-per-node N -m ltcli -- extract --run DIR ...`.
    """
    from .rundir import RunDir
    from .stages import extract_splits

    rd = RunDir(run)
    splits = [s.strip() for item in split for s in item.split(",") if s.strip()]
    if "all" in splits:
        splits = [s for s in ("train", "val", "test") if s in rd.read().get("splits", {})]
    for s in splits:
        if s not in ("train", "val", "test"):
            raise LtcliError(f"--split {s}: choose train, val, test or all")
    options = dict(dtype=dtype, views=views, batch_size=batch_size, device=device, amp=amp, workers=workers,
                   gpu_decode=gpu_decode, seed=seed, overwrite=overwrite, skip_bad=skip_bad_images)
    paths = extract_splits(rd, splits, checkpoint=checkpoint, data=data, out=out, options=options)
    if int(os.environ.get("RANK", "0")) == 0:
        emit(paths, as_json, {"features": [str(p) for p in paths]})


@app.command("fit-head")
def fit_head_cmd(
    run: Path = typer.Option(Path("ltcli-run"), "--run", help=RUN_HELP),
    method: str = typer.Option(..., "--method", "-m", help=METHOD_HELP),
    features: Optional[str] = typer.Option(None, "--features", help="Train features .h5 (default RUN/features/train.h5; '-' reads the path from stdin)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Head file (default RUN/heads/METHOD.pt)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="crt / lws: epochs over the cached features (default 10)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="crt / lws: peak learning rate (cosine to 0)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="crt / lws: batch size (default 512)."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="crt / lws: weight decay."),
    tau: Optional[float] = typer.Option(None, "--tau", help="tau-norm / logit-adjust: τ (default 1; `tune-tau` picks it on val)."),
    keep_bias: bool = typer.Option(False, "--keep-bias", help="tau-norm: keep the joint bias."),
    metric: Optional[str] = typer.Option(None, "--metric", help="ncm / knn: cosine or euclidean."),
    k: Optional[int] = typer.Option(None, "--k", help="knn: neighbours (default 10)."),
    weighting: Optional[str] = typer.Option(None, "--weighting", help="knn: votes weighted by 'distance' (default) or 'count'."),
    momentum: Optional[float] = typer.Option(None, "--momentum", help="crt / lws: SGD momentum (default 0.9)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="crt / lws: sampling and init seed."),
    device: Optional[str] = typer.Option(None, "--device", help=DEVICE_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
):
    """Fit one classifier head on cached train features (seconds; no backbone needed).

    Prints the head path on stdout, so it chains:
    `ltcli extract --run r --split train | ltcli fit-head --features - --method crt --run r`
    """
    from .rundir import RunDir
    from .stages import fit_head, head_options

    rd = RunDir(run)
    features_path = Path(_read_stdin_path(features, "--features") or rd.features("train"))
    out_path = out or rd.head(method)
    given = dict(epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay, tau=tau,
                 keep_bias=keep_bias or None, metric=metric, k=k, weighting=weighting, momentum=momentum,
                 seed=seed, device=device)
    options = head_options(method, {key: v for key, v in given.items() if v is not None})
    path = fit_head(features_path, method, out_path, options, run=rd if out is None else None)
    emit([path], as_json, {"head": str(path), "method": method, "options": options})


@app.command("tune-tau")
def tune_tau_cmd(
    run: Path = typer.Option(Path("ltcli-run"), "--run", help=RUN_HELP),
    split: str = typer.Option("val", "--split", help="Held-out split to choose τ on (val; test only with --allow-test)."),
    method: str = typer.Option("tau-norm", "--method", help="tau-norm or logit-adjust."),
    grid: str = typer.Option("0:2:0.05", "--grid", help="START:STOP:STEP (inclusive) or a comma list."),
    metric: str = typer.Option("overall", "--metric", help="What to maximise: overall, macro or few."),
    keep_bias: bool = typer.Option(False, "--keep-bias", help="tau-norm: keep the joint bias."),
    features: Optional[str] = typer.Option(None, "--features", help="Features of the tuning split (default RUN/features/SPLIT.h5; '-' = stdin)."),
    train_features: Optional[Path] = typer.Option(None, "--train-features", help="Train features (default RUN/features/train.h5, if present)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Head file (default RUN/heads/METHOD.pt)."),
    plot: bool = typer.Option(False, "--plot", help="Also write accuracy against τ as PNG in RUN/reports."),
    allow_test: bool = typer.Option(False, "--allow-test", help="Allow tuning on the test split (the output says so)."),
    many: float = typer.Option(100, "--many", help="Many-shot: more than this many train images."),
    few: float = typer.Option(20, "--few", help="Few-shot: fewer than this many train images."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
):
    """Choose τ for tau-norm (or logit-adjust) by grid search on a held-out split.

    The dot products are computed once; each τ only rescales columns, so the whole grid costs
    about one evaluation. Prints the per-τ table, writes the head with the best τ.
    """
    from .grid import parse_grid
    from .rundir import RunDir
    from .stages import tune_tau

    if method not in ("tau-norm", "logit-adjust"):
        raise LtcliError(f"--method {method}: tune-tau supports tau-norm and logit-adjust")
    if metric not in ("overall", "macro", "few", "many", "medium"):
        raise LtcliError(f"--metric {metric}: choose overall, macro or few")
    taus = parse_grid(grid)
    rd = RunDir(run)
    split_path = Path(_read_stdin_path(features, "--features") or rd.features(split))
    train_path = train_features or (rd.features("train") if rd.features("train").exists() else None)
    result = tune_tau(split_path, train_path, method, taus, metric, keep_bias, out or rd.head(method),
                      rd.reports if (out is None or plot) else None, plot, allow_test, many, few,
                      run=rd if out is None else None)
    emit(result["paths"], as_json, {"best": result["best"], "rows": result["rows"],
                                    "paths": [str(p) for p in result["paths"]]})


@app.command("eval")
def eval_cmd(
    run: Path = typer.Option(Path("ltcli-run"), "--run", help=RUN_HELP),
    split: str = typer.Option("test", "--split", help="Split to evaluate on."),
    heads: Optional[List[str]] = typer.Option(None, "--heads", help="Heads to evaluate (names in RUN/heads or .pt paths; repeat or comma-separate). Default: all."),
    features: Optional[str] = typer.Option(None, "--features", help="Features of the split (default RUN/features/SPLIT.h5; '-' = stdin)."),
    many: float = typer.Option(100, "--many", help="Many-shot: more than this many train images."),
    few: float = typer.Option(20, "--few", help="Few-shot: fewer than this many train images."),
    plot: bool = typer.Option(False, "--plot", help="Per-class accuracy against train count, and weight norms of linear heads (PNG)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Report folder (default RUN/reports)."),
    as_json: bool = typer.Option(False, "--json", help="Print the full report (all heads, all metrics) as JSON."),
):
    """Evaluate every head (or those named) on a split: top-1, top-5, macro, many / medium / few.

    Writes reports/eval-SPLIT.json and a per-class CSV; prints the report paths.
    """
    from .rundir import RunDir
    from .stages import discover_heads, evaluate_heads

    rd = RunDir(run)
    names = [n.strip() for item in (heads or []) for n in item.split(",") if n.strip()]
    features_path = Path(_read_stdin_path(features, "--features") or rd.features(split))
    result = evaluate_heads(features_path, discover_heads(rd, names), out or rd.reports, many, few, plot, run=rd)
    emit(result["paths"], as_json, result["summary"])


@app.command("info")
def info_cmd(
    path: Path = typer.Argument(..., help="A features .h5 file."),
    as_json: bool = typer.Option(False, "--json", help="Print the information as JSON on stdout."),
):
    """Describe a feature cache: shape, dtype, split, classes with counts and shot groups,
    provenance and completeness."""
    from .console import err_console
    from .features import info, info_table

    d = info(path)
    if as_json:
        typer.echo(json.dumps(d, default=str))
    else:
        err_console.print(info_table(d))


@app.command("predict")
def predict_cmd(
    inputs: List[str] = typer.Argument(..., help="Image files or folders; '-' reads paths from stdin, one per line."),
    run: Path = typer.Option(Path("ltcli-run"), "--run", help=RUN_HELP),
    head: str = typer.Option("crt", "--head", help="Head name in RUN/heads or a .pt path."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Backbone checkpoint (default RUN/backbone.pt)."),
    top_k: int = typer.Option(5, "--top-k", help="How many labels per image."),
    fmt: str = typer.Option("csv", "--format", help="csv or json (on stdout)."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
):
    """Label new images with the backbone and a fitted head; prints CSV (path, label, score ...) or JSON."""
    from .rundir import RunDir
    from .stages import predict_images

    if fmt not in ("csv", "json"):
        raise LtcliError(f"--format {fmt}: choose csv or json")
    if top_k < 1:
        raise LtcliError(f"--top-k {top_k}: must be at least 1")
    items = list(inputs)
    if items == ["-"]:
        items = [line.strip() for line in sys.stdin if line.strip()]
    rd = RunDir(run)
    head_path = Path(head) if head.endswith(".pt") else rd.head(head)
    rows = predict_images(rd, head_path, items, checkpoint=checkpoint, top_k=top_k, device_name=device)
    if fmt == "json":
        typer.echo(json.dumps(rows))
        return
    import csv

    writer = csv.writer(sys.stdout)
    k = len(rows[0]["labels"])
    writer.writerow(["path"] + [c for i in range(1, k + 1) for c in (f"label{i}", f"score{i}")])
    for r in rows:
        writer.writerow([r["path"]] + [v for pair in zip(r["labels"], r["scores"]) for v in pair])


@app.command("quickstart")
def quickstart_cmd(
    run: Path = typer.Option(Path("ltcli-run"), "--run", help=RUN_HELP),
    data: str = typer.Option("synthetic", "--data", help=DATA_HELP),
    imbalance_factor: Optional[float] = typer.Option(None, "--imbalance-factor", help="Long-tail profile for real data (IF >= 1)."),
    val_per_class: int = typer.Option(0, "--val-per-class", help="Balanced val hold-out per class (to tune τ on)."),
    arch: str = typer.Option("resnet8", "--arch", help="Backbone (resnet8 is sized for the CPU quick start)."),
    epochs: int = typer.Option(25, "--epochs", help="Stage-1 epochs (25 shows the decoupling effect on the synthetic default in well under a CPU minute)."),
    batch_size: int = typer.Option(128, "--batch-size", help="Stage-1 batch size."),
    lr: float = typer.Option(0.1, "--lr", help="Stage-1 peak learning rate (warm-up, then cosine)."),
    weight_decay: float = typer.Option(5e-4, "--weight-decay", help="Stage-1 L2 penalty on every parameter."),
    warmup_epochs: int = typer.Option(5, "--warmup-epochs", help="Stage-1 warm-up epochs."),
    seed: int = typer.Option(0, "--seed", help="Seeds data selection, init, sampling and augmentation."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    amp: str = typer.Option("auto", "--amp", help="auto (bf16 on CUDA), bf16 or off."),
    workers: int = typer.Option(4, "--workers", help="Decode / loader worker processes."),
    grid: str = typer.Option("0:2:0.05", "--grid", help="τ grid for tau-norm and logit-adjust."),
    tune_metric: str = typer.Option("overall", "--tune-metric", help="Pick τ by overall, macro or few."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Retrain and rewrite everything in --run."),
    as_json: bool = typer.Option(False, "--json", help="Print the evaluation summary as JSON."),
):
    """The whole recipe in one go: train (instance sampling), extract, fit every head, tune τ on val,
    evaluate on test, and print the joint / NCM / cRT / τ-norm / LWS comparison table.

    With no options it runs on the built-in synthetic long-tailed dataset on the CPU in a few minutes.
    """
    from .grid import parse_grid
    from .pipeline import quickstart
    from .rundir import RunDir
    from .train import TrainConfig

    cfg = TrainConfig(
        data=_data_config(data, seed, imbalance_factor, val_per_class, False, False, None, None),
        arch=arch, sampling="instance", epochs=epochs, batch_size=batch_size, lr=lr,
        weight_decay=weight_decay, warmup_epochs=warmup_epochs, seed=seed, device=device, amp=amp,
        workers=workers,
    )
    result = quickstart(cfg, RunDir(run), overwrite=overwrite, grid=parse_grid(grid), tune_metric=tune_metric,
                        extract_options={"workers": workers, "amp": amp})
    emit(result["paths"], as_json, result["summary"])


@app.command("archs")
def archs_cmd():
    """List the backbone architectures --arch accepts."""
    from .models import available_archs

    for name in available_archs():
        typer.echo(name)


def main(argv: Optional[List[str]] = None) -> None:
    """Entry point: run the app and turn every failure into a one-line message + exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--"]:
        # `torchrun ... -m ltcli -- train-backbone --run DIR`: the `--` stops torchrun's argparse
        # from reading `--run` as an abbreviation of its own --run-path (an "ambiguous option"
        # error); Python versions that pass the `--` on to us get it dropped here
        args = args[1:]
    if "--debug" in args:
        _DEBUG["on"] = True
    try:
        app(args=args, prog_name="ltcli", standalone_mode=False)
    except _Exit as exc:
        sys.exit(exc.exit_code)
    except _Abort:
        typer.echo("ltcli: aborted", err=True)
        sys.exit(130)
    except _UsageBase as exc:  # usage errors: unknown option, bad value
        if _DEBUG["on"]:
            raise
        typer.echo(f"ltcli: error: {_one_line(exc.format_message())}", err=True)
        sys.exit(2)
    except LtcliError as exc:
        if _DEBUG["on"]:
            raise
        typer.echo(f"ltcli: error: {_one_line(str(exc))}", err=True)
        sys.exit(2)
    except JobFailed as exc:
        if _DEBUG["on"]:
            raise
        typer.echo(f"ltcli: failed: {_one_line(str(exc))}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("ltcli: interrupted", err=True)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(1)
    except Exception as exc:  # a bug or an environment failure: still one line, exit 1
        if _DEBUG["on"]:
            raise
        typer.echo(f"ltcli: failed: {type(exc).__name__}: {_one_line(str(exc))} (rerun with --debug for the traceback)",
                   err=True)
        sys.exit(1)


def _one_line(text: str) -> str:
    return " ".join(text.strip().split())

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

import click
import typer

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
    arch: str = typer.Option("resnet8", "--arch", help="resnet8/resnet20/resnet32 (CIFAR-size), resnet10, or any torchvision.models name."),
    weights: Optional[str] = typer.Option(None, "--weights", help="torchvision weight name, e.g. IMAGENET1K_V1."),
    sampling: str = typer.Option("instance", "--sampling", help="instance | class | sqrt | progressive."),
    sampling_q: Optional[float] = typer.Option(None, "--sampling-q", help="General p_j ∝ n_j^q (overrides --sampling's q)."),
    epochs: int = typer.Option(30, "--epochs"),
    batch_size: int = typer.Option(128, "--batch-size", help="Global batch (split across DDP ranks)."),
    lr: float = typer.Option(0.1, "--lr", help="Peak learning rate (linear warm-up, then cosine to 0)."),
    momentum: float = typer.Option(0.9, "--momentum"),
    weight_decay: float = typer.Option(5e-4, "--weight-decay"),
    warmup_epochs: int = typer.Option(5, "--warmup-epochs"),
    seed: int = typer.Option(0, "--seed", help="Seeds data selection, init, sampling and augmentation."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    amp: str = typer.Option("auto", "--amp", help="auto (bf16 on CUDA), bf16 or off."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Training size (default: native for small images, 224 otherwise)."),
    workers: int = typer.Option(4, "--workers", help="Decode / loader worker processes."),
    skip_bad_images: bool = typer.Option(False, "--skip-bad-images", help="Skip unreadable images (recorded in run.json) instead of failing."),
    allow_outside_root: bool = typer.Option(False, "--allow-outside-root", help="Let list-file paths point outside ROOT."),
    synthetic_classes: Optional[int] = typer.Option(None, "--synthetic-classes", help="Classes of the synthetic dataset."),
    synthetic_size: Optional[int] = typer.Option(None, "--synthetic-size", help="Image side of the synthetic dataset."),
    resume: bool = typer.Option(False, "--resume", help="Continue from backbone-last.pt (same configuration)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace another run's files in --run."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
):
    """Stage 1: train a backbone + joint classifier on the (long-tailed) train split.

    Writes run.json, backbone.pt, backbone-last.pt (every epoch, for --resume) and metrics.jsonl.
    Under torchrun it trains with DDP: `torchrun --nproc-per-node N -m ltcli train-backbone ...`.
    """
    from .rundir import RunDir
    from .train import TrainConfig, train_backbone

    cfg = TrainConfig(
        data=_data_config(data, seed, imbalance_factor, val_per_class, skip_bad_images, allow_outside_root,
                          synthetic_classes, synthetic_size),
        arch=arch, weights=weights, sampling=sampling, sampling_q=sampling_q, epochs=epochs,
        batch_size=batch_size, lr=lr, momentum=momentum, weight_decay=weight_decay,
        warmup_epochs=warmup_epochs, seed=seed, device=device, amp=amp, image_size=image_size,
        workers=workers,
    )
    result = train_backbone(cfg, RunDir(run), resume=resume, overwrite=overwrite)
    if int(os.environ.get("RANK", "0")) == 0:
        emit([result["backbone"]], as_json, {"backbone": result["backbone"], "run": result["run"],
                                             "epochs": result["history"]})


@app.command("archs")
def archs_cmd():
    """List the backbone architectures --arch accepts."""
    from .models import available_archs

    for name in available_archs():
        typer.echo(name)


def main(argv: Optional[List[str]] = None) -> None:
    """Entry point: run the app and turn every failure into a one-line message + exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in args:
        _DEBUG["on"] = True
    try:
        app(args=args, prog_name="ltcli", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        typer.echo("ltcli: aborted", err=True)
        sys.exit(130)
    except click.exceptions.ClickException as exc:  # usage errors: unknown option, bad value
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

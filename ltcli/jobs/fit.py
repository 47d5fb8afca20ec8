"""`ltcli fit-head`: fit one classifier head on cached train features (seconds; no backbone)."""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..cache import check_same_source, read_features
from ..console import err_console, progress_bar
from ..errors import JobFailed, LtcliError
from ..heads import build_head, head_class, methods, save_head
from ..heads.base import same_shape
from ..options import Options, opt
from ..rundir import RunDir
from ..runtime import DEVICE_HELP
from .common import head_provenance, input_path, log_event
from .guards import check_features_belong_to_run, check_replaceable_head


@dataclass(kw_only=True)
class FitOptions(Options):
    command = "fit-head"

    method: str = opt(None, str, "The head to fit (described above).", optional=True, metavar="|".join(methods()))
    features: str | None = opt(None, str, "Train features .h5 (default RUN/features/train.h5; '-' reads the "
                               "path from stdin).", optional=True)
    out: Path | None = opt(None, Path, "Head file (default RUN/heads/METHOD.pt).", optional=True)
    device: str | None = opt(None, str, DEVICE_HELP + " [default: auto]", optional=True)
    head: dict = dataclasses.field(default_factory=dict)  # the head's own options (its registry entry)

    def validate(self) -> None:
        if self.method is None:
            raise LtcliError("--method: missing; choose the head to fit (see `ltcli fit-head --help`)")
        head_class(self.method).check_options(dict(self.head))  # flags of another head are refused now


@dataclass
class FitResult:
    path: Path
    method: str
    options: dict[str, Any]  # every option the head used, defaults included


def run(opts: FitOptions, run_dir: RunDir) -> FitResult:
    """Fit one head on train features and save it atomically."""
    features_path = input_path(opts.features, "--features", run_dir.features("train"))  # stdin first
    with run_dir.writing() if opts.out is None else contextlib.nullcontext():
        return _run(opts, run_dir, features_path)


def _run(opts: FitOptions, run_dir: RunDir, features_path: Path) -> FitResult:
    out_path = Path(opts.out or run_dir.head(head_class(opts.method).method))
    fs = read_features(features_path, mmap=True)  # float16 pages, no float32 copy of N x D
    if fs.split != "train":
        raise LtcliError(
            f"{features_path}: holds the '{fs.split}' split; heads are fitted on train features "
            "(tune τ on val with `ltcli tune-tau`)"
        )
    if opts.out is None:  # into the run's heads/: only features of the run's own backbone
        check_features_belong_to_run(run_dir, fs, features_path)
    check_replaceable_head(out_path)
    head = build_head(opts.method, **opts.head)
    epochs = head.options.get("epochs")
    with progress_bar(disable=not epochs) as bar:  # heads that train: epochs (and steps) as they go
        task = bar.add_task(f"fit {head.method}", total=epochs or 1, rate="")
        head.fit(fs, device=opts.device, progress=lambda done, total: bar.update(task, completed=done),
                 held_out=_held_out(run_dir, opts, fs, features_path) if head.uses_held_out else None)
    _check_fitted_finite(head, opts.method, opts.head, features_path)
    if getattr(head, "fit_note", None):
        err_console.print(f"{head.method}: {head.fit_note}", highlight=False)
    save_head(head, out_path, head_provenance(fs, features_path, {"method": head.method, "options": head.options}))
    log_event(run_dir if opts.out is None else None,
              {"event": "fit-head", "method": head.method, "head": str(out_path), "options": head.options})
    return FitResult(out_path, head.method, dict(head.options))


def _held_out(run_dir: RunDir, opts: FitOptions, fs, features_path: Path):
    """The run's val features beside its own train features, for a head that checks itself on
    held-out data; None (the head then checks itself on train rows) without them, or where they
    do not match the train features (another backbone or data, D, classes, or no rows)."""
    path = run_dir.features("val")
    if opts.features is not None or not path.exists():
        return None
    try:
        val = read_features(path, mmap=True)
        check_same_source(str(features_path), fs.attrs, str(path), val.attrs)
    except LtcliError:
        return None
    return val if val.split == "val" and same_shape(val, fs) and len(val.labels) else None


def _check_fitted_finite(head, method: str, options: dict, features_path: Path) -> None:
    """A diverged fit (e.g. a huge --lr) must not be saved as a head that no stage can load."""
    for key, value in head.state().items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            if "lr" in head.options_spec:
                raise JobFailed(f"--lr {options.get('lr', 'default')}: {method} training diverged ('{key}' became "
                                "NaN or inf); use a smaller --lr")
            raise JobFailed(f"{features_path}: fitting {method} gave NaN or inf in '{key}'")

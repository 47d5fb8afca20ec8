"""`ltcli tune-tau`: choose τ of a tunable head by grid search on a held-out split.

The dot products are computed once; each τ only rescales or shifts columns, so the whole grid
costs about one evaluation. The head needs only the stage-1 classifier and the train counts,
which every split's file carries: the train features are not read (only their attributes,
to check they come from the same backbone)."""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ..cache import check_compatible, read_features
from ..console import err_console
from ..errors import LtcliError
from ..grid import parse_grid
from ..heads import build_head, head_class, save_head, tunable_methods
from ..heads.base import check_finite, mean_views
from ..io import atomic_write_json
from ..options import Options, opt
from ..rundir import RunDir
from ..runtime import DEVICE_HELP
from ..tune import METRICS, grid_edge_note, pick_best, tau_sweep, tau_table
from .common import head_provenance, input_path, log_event
from .guards import check_features_belong_to_run, check_replaceable_head


@dataclass(kw_only=True)
class TuneOptions(Options):
    command = "tune-tau"

    split: str = opt("val", str, "Held-out split to choose τ on (val; test only with --allow-test).")
    method: str | None = opt(None, str, "The tunable head (default: the first of them).", optional=True,
                             metavar="|".join(tunable_methods()))
    grid: str = opt("0:2:0.05", str, "START:STOP:STEP (inclusive) or a comma list.")
    metric: str = opt("overall", str, "What to maximise.", choices=METRICS)
    features: str | None = opt(None, str, "Features of the tuning split (default RUN/features/SPLIT.h5; '-' = "
                               "stdin).", optional=True)
    train_features: Path | None = opt(None, Path, "Train features whose provenance must match (default "
                                      "RUN/features/train.h5, if present; only its attributes are read).",
                                      optional=True)
    out: Path | None = opt(None, Path, "Head file (default RUN/heads/METHOD.pt).", optional=True)
    plot: bool = opt(False, bool, "Also write accuracy against τ as PNG in RUN/reports.")
    allow_test: bool = opt(False, bool, "Allow tuning on the test split (the output says so).")
    many: float = opt(100, float, "Many-shot: more than this many train images.", min=0.0)
    few: float = opt(20, float, "Few-shot: fewer than this many train images.", min=0.0)
    device: str | None = opt(None, str, DEVICE_HELP + " [default: auto]", optional=True)
    head: dict = dataclasses.field(default_factory=dict)  # the tuned head's other options (keep_bias)

    def validate(self) -> None:
        method = self.method or tunable_methods()[0]
        if method not in tunable_methods():
            from ..tune import tunable_head

            tunable_head(method)  # raises naming the tunable heads
        head_class(method).check_options(dict(self.head))
        parse_grid(self.grid)


def run(opts: TuneOptions, run_dir: RunDir, *, report: bool | None = None) -> dict:
    """Sweep τ on a held-out split, pick the best by `metric`, write the head with that τ."""
    split_path = input_path(opts.features, "--features", run_dir.features(opts.split))  # stdin first
    with run_dir.writing() if opts.out is None else contextlib.nullcontext():
        return _run(opts, run_dir, split_path, report=report)


def _run(opts: TuneOptions, run_dir: RunDir, split_path: Path, *, report: bool | None = None) -> dict:
    method = opts.method or tunable_methods()[0]
    taus = parse_grid(opts.grid)
    out_path = Path(opts.out or run_dir.head(method))
    report_dir = run_dir.reports if (opts.out is None or opts.plot) and report is not False else None
    fs = read_features(split_path, mmap=True)
    if fs.split == "train":
        raise LtcliError(f"{split_path}: τ must be chosen on held-out data, not the train split (use --split val)")
    if fs.split == "test" and not opts.allow_test:
        raise LtcliError(
            f"{split_path}: tuning τ on the test split reports an optimistic test accuracy; "
            "use --split val (hold one out with train-backbone --val-per-class K) or pass --allow-test"
        )
    train_path = opts.train_features or (run_dir.features("train") if run_dir.features("train").exists() else None)
    if train_path is not None:
        check_compatible(str(train_path), fs)
    if opts.out is None:
        check_features_belong_to_run(run_dir, fs, split_path)
    check_replaceable_head(out_path)
    if fs.weight is None:
        raise LtcliError(f"{split_path}: holds no stage-1 classifier (/classifier/weight)")
    check_finite(fs.weight, str(split_path), "stage-1 classifier weights")  # the classifier's fault, not the rows'
    if fs.bias is not None:
        check_finite(fs.bias.reshape(-1, 1), str(split_path), "stage-1 classifier biases")
    rows = tau_sweep(mean_views(fs.features), fs.labels, fs.weight, fs.bias, fs.train_counts, taus, method=method,
                     keep_bias=bool(opts.head.get("keep_bias", False)), many=opts.many, few=opts.few,
                     device=opts.device)
    best = pick_best(rows, opts.metric)
    title = _report_table(rows, best, method, fs.split, opts.metric)

    head = build_head(method, **{**opts.head, "tau": best["tau"]})
    head.fit(fs, device="cpu")  # only the stage-1 classifier and the counts are used
    extra = {"method": method, "options": head.options, "tuned_on": fs.split, "tuned_file": str(split_path),
             "metric": opts.metric, "grid": list(map(float, taus)), "sweep": rows,
             "tuned_on_test": fs.split == "test"}
    save_head(head, out_path, head_provenance(fs, Path(train_path or split_path), extra))
    written = [out_path] + _write_reports(report_dir, method, fs.split, opts, best, rows, title)
    log_event(run_dir if opts.out is None else None,
              {"event": "tune-tau", "method": method, "split": fs.split, "best_tau": best["tau"],
               "metric": opts.metric, "value": best[opts.metric]})
    return {"best": best, "rows": rows, "paths": written, "method": method}


def _report_table(rows, best, method, split, metric) -> str:
    title = f"{method} τ search on {split} (pick by {metric})"
    if split == "test":
        title += "  [TUNED ON TEST: optimistic]"
    err_console.print(tau_table(rows, best["tau"], title=title))
    err_console.print(f"best τ = {best['tau']:g}  ({metric} {100 * best[metric]:.2f}%)", highlight=False)
    edge = grid_edge_note(rows, metric)
    if edge:
        err_console.print(f"[yellow]note:[/yellow] {edge}", highlight=False)
    return title


def _write_reports(report_dir, method, split, opts, best, rows, title) -> list[Path]:
    if report_dir is None:
        return []
    report = report_dir / f"tune-{method}-{split}.json"
    atomic_write_json(report, {"method": method, "split": split, "metric": opts.metric, "best": best,
                               "rows": rows, "tuned_on_test": split == "test"})
    written = [report]
    if opts.plot:
        from ..plots import plot_tau_curve

        png = report_dir / f"tune-{method}-{split}.png"
        plot_tau_curve(rows, best["tau"], png, title=title)
        written.append(png)
    return written

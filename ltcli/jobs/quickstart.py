"""`ltcli quickstart`: the whole decoupling recipe in one run directory.

train-backbone (instance sampling) -> extract train/val/test -> fit every head -> tune τ of
the tunable heads on val -> eval on test -> the comparison table. Which heads, in which
order, comes from the head registry."""

from __future__ import annotations

from dataclasses import dataclass

from ..console import err_console
from ..errors import LtcliError
from ..grid import parse_grid
from ..heads import HEADS, baseline_method, methods
from ..options import opt
from ..rundir import RunDir
from ..tune import METRICS
from . import evaluate, extract, fit, train, tune


@dataclass(kw_only=True)
class QuickstartOptions(train.TrainOptions):
    command = "quickstart"

    epochs: int = opt(25, int, "Stage-1 epochs (25 shows the decoupling effect on the synthetic default in well "
                      "under a CPU minute).", min=1)
    grid: str = opt("0:2:0.05", str, "τ grid of the tunable heads (START:STOP:STEP or a comma list).")
    tune_metric: str = opt("overall", str, "Pick τ by this metric on val.", choices=METRICS)

    def validate(self) -> None:
        super().validate()
        parse_grid(self.grid)

    def train_options(self) -> train.TrainOptions:
        fields = {k: v for k, v in self.to_dict().items() if k in train.TrainOptions.spec()}
        return train.TrainOptions(**fields)


def run(opts: QuickstartOptions, run_dir: RunDir, *, overwrite: bool = False,
        head_options: dict[str, dict] | None = None) -> dict:
    if run_dir.backbone.exists() and not overwrite:
        err_console.print(f"[bold]reusing[/bold] {run_dir.backbone} (pass --overwrite to retrain)")
    else:
        err_console.rule(f"stage 1: train the backbone ({opts.sampling} sampling)")
        train.run(opts.train_options(), run_dir, overwrite=overwrite)
    info = run_dir.read()
    splits = [s for s in ("train", "val", "test") if s in info["splits"]]
    if "test" not in splits:
        raise LtcliError(f"--data {opts.data}: quickstart needs a test split to report on")
    err_console.rule("extract features once per split")
    extract.run(extract.ExtractOptions(split=splits, device=opts.device, amp=opts.amp, workers=opts.workers,
                                       overwrite=overwrite), run_dir)
    err_console.rule("stage 2: classifier heads over the cached features")
    tune_split = "val" if "val" in splits else "test"
    for method in methods():
        given = dict((head_options or {}).get(method, {}))
        if HEADS[method].tunable:
            given.pop("tau", None)
            tune.run(tune.TuneOptions(split=tune_split, method=method, grid=opts.grid, metric=opts.tune_metric,
                                      plot=True, allow_test=tune_split == "test", head=given), run_dir)
        else:
            fit.run(fit.FitOptions(method=method, head=given), run_dir)
            err_console.print(f"fitted {method:>12} -> {run_dir.head(method)}", highlight=False)
    err_console.rule("evaluation on test")
    result = evaluate.run(evaluate.EvalOptions(split="test", plot=True), run_dir)
    print_gains(result["results"])
    return result


def print_gains(results: dict) -> None:
    """What each head buys over the baseline, overall and on the few-shot classes."""
    base = results.get(baseline_method())
    if not base:
        return
    lines = []
    for name, m in results.items():
        if name != baseline_method() and base["few"] is not None and m["few"] is not None:
            lines.append(f"{name}: few-shot {100 * (m['few'] - base['few']):+.1f} pts, "
                         f"overall {100 * (m['overall'] - base['overall']):+.1f} pts")
    if lines:
        err_console.print(f"decoupling gains vs {baseline_method()}: " + "; ".join(lines), highlight=False)

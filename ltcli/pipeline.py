"""`ltcli quickstart`: the whole decoupling recipe in one run directory.

train-backbone (instance sampling) -> extract train/val/test -> fit every head ->
tune τ on val -> eval on test -> the comparison table.
"""

from __future__ import annotations

from .console import err_console
from .errors import LtcliError
from .rundir import RunDir
from .stages import discover_heads, evaluate_heads, extract_splits, fit_head, tune_tau
from .train import TrainConfig, train_backbone

FITTED_HEADS = ["joint", "ncm", "crt", "lws", "knn"]
TUNED_HEADS = ["tau-norm", "logit-adjust"]


def quickstart(cfg: TrainConfig, run: RunDir, *, overwrite: bool, grid: list[float], tune_metric: str,
               extract_options: dict, head_options: dict[str, dict] | None = None) -> dict:
    if tune_metric not in ("overall", "macro", "many", "medium", "few"):
        raise LtcliError(f"--tune-metric {tune_metric}: choose overall, macro, many, medium or few")
    if run.backbone.exists() and not overwrite:
        err_console.print(f"[bold]reusing[/bold] {run.backbone} (pass --overwrite to retrain)")
        info = run.read()
    else:
        err_console.rule("stage 1: train the backbone (instance-balanced sampling)")
        train_backbone(cfg, run, overwrite=overwrite)
        info = run.read()
    splits = [s for s in ("train", "val", "test") if s in info["splits"]]
    if "test" not in splits:
        raise LtcliError(f"--data {cfg.data.spec}: quickstart needs a test split to report on")
    err_console.rule("extract features once per split")
    extract_splits(run, splits, checkpoint=None, data=None, out=None,
                   options={"device": cfg.device, "overwrite": overwrite, **extract_options})
    err_console.rule("stage 2: classifier heads over the cached features")
    for method in FITTED_HEADS:
        fit_head(run.features("train"), method, run.head(method), (head_options or {}).get(method, {}), run=run)
        err_console.print(f"fitted {method:>12} -> {run.head(method)}", highlight=False)
    tune_split = "val" if "val" in splits else "test"
    for method in TUNED_HEADS:
        tune_tau(run.features(tune_split), run.features("train"), method, grid, tune_metric, False,
                 run.head(method), run.reports, plot=True, allow_test=tune_split == "test",
                 many=100, few=20, run=run)
    err_console.rule("evaluation on test")
    result = evaluate_heads(run.features("test"), discover_heads(run, None), run.reports, 100, 20, plot=True, run=run)
    _print_gains(result["results"])
    return result


def _print_gains(results: dict) -> None:
    joint = results.get("joint")
    if not joint:
        return
    lines = []
    for name in ("crt", "tau-norm", "lws"):
        m = results.get(name)
        if m and joint["few"] is not None and m["few"] is not None:
            lines.append(f"{name}: few-shot {100 * (m['few'] - joint['few']):+.1f} pts, "
                         f"overall {100 * (m['overall'] - joint['overall']):+.1f} pts vs joint")
    if lines:
        err_console.print("decoupling gains: " + "; ".join(lines), highlight=False)

"""τ search for τ-normalisation and post-hoc logit adjustment, vectorised over the grid.

Both heads are a per-class rescaling or shift of the joint dot products d_j = w_jᵀf:
  tau-norm       z_j(τ) = d_j / ‖w_j‖^τ  (+ b_j with keep_bias)
  logit-adjust   z_j(τ) = d_j + b_j − τ·log(n_j / N)
so the expensive N x D x C product is computed ONCE (in row chunks on the device) and each
τ costs only an elementwise op and an argmax over a chunk that stays in cache. A 41-value
grid then costs about one evaluation instead of 41.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .errors import LtcliError
from .evaluate import GROUP_NAMES, _pct, group_means, shot_groups

METHODS = ("tau-norm", "logit-adjust")
METRICS = ("overall", "macro", "many", "medium", "few")
# Rows per matmul chunk (bounds device memory for the dot products) and, within it, rows per
# τ pass on the CPU (an N x C block of ~1 MB stays in cache across the elementwise op + argmax).
_MATMUL_ROWS = 8192
_CPU_TAU_ELEMS = 1 << 18


def _device(device: Any) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def tau_columns(
    weight: torch.Tensor,
    train_counts: Any,
    taus: Sequence[float],
    method: str,
) -> torch.Tensor:
    """T x C per-τ column factors: scales (tau-norm) or additive offsets (logit-adjust).

    Computed in float64 so the result matches building the normalised weight explicitly."""
    t = torch.as_tensor([float(x) for x in taus], dtype=torch.float64)[:, None]
    if method == "tau-norm":
        # A zero weight row has zero dot products; clamping keeps 0 * scale finite (= 0).
        norms = weight.detach().double().norm(dim=1).clamp_min(1e-12)
        return torch.exp(-t * norms.log()[None, :])
    counts = torch.as_tensor(np.asarray(train_counts), dtype=torch.float64).reshape(-1)
    return -t * (counts / counts.sum()).log()[None, :]


def _validate(features, labels, weight, bias, train_counts, taus, method, many, few):
    if method not in METHODS:
        raise LtcliError(f"--method: τ search supports {', '.join(METHODS)}, not {method!r}")
    if len(taus) == 0:
        raise LtcliError("--grid: no τ values")
    if any(not math.isfinite(float(t)) for t in taus):
        raise LtcliError("--grid: τ values must be finite")
    if features.ndim == 3 and features.shape[1] == 1:
        features = features[:, 0]
    if features.ndim != 2:
        raise LtcliError(f"features: expected N x D, got shape {tuple(features.shape)} (τ is tuned on a single view)")
    if weight.ndim != 2 or weight.shape[1] != features.shape[1]:
        raise LtcliError(
            f"classifier weight: shape {tuple(weight.shape)} does not match feature dimension {features.shape[1]}"
        )
    num_classes = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (num_classes,):
        raise LtcliError(f"classifier bias: shape {tuple(bias.shape)}, expected ({num_classes},)")
    counts = np.asarray(train_counts.cpu() if isinstance(train_counts, torch.Tensor) else train_counts).reshape(-1)
    if counts.shape[0] != num_classes:
        raise LtcliError(f"train counts: {counts.shape[0]} classes, classifier has {num_classes}")
    if method == "logit-adjust" and (counts <= 0).any():
        j = int(np.flatnonzero(counts <= 0)[0])
        raise LtcliError(f"train counts: class {j} has no training samples; logit-adjust needs log(n_j) finite")
    labels = torch.as_tensor(labels).reshape(-1).long()
    if labels.shape[0] != features.shape[0]:
        raise LtcliError(f"labels: {labels.shape[0]} labels for {features.shape[0]} feature rows")
    if labels.numel() == 0:
        raise LtcliError("features: no samples to evaluate")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise LtcliError(f"labels: class ids must lie in 0..{num_classes - 1}")
    shot_groups(counts, many, few)  # validates the thresholds
    return features, labels, counts


@torch.no_grad()
def tau_predictions(
    features: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    columns: torch.Tensor,
    method: str,
    keep_bias: bool = False,
    device: Any = None,
) -> torch.Tensor:
    """T x N predicted classes (int64, on `device`), one row per τ (one row of `columns`).

    Ties in the argmax go to the lowest class index, as torch.argmax does."""
    dev = _device(device)
    dtype = torch.float64 if torch.float64 in (features.dtype, weight.dtype) else torch.float32
    w = weight.detach().to(dev, dtype)
    cols = columns.to(dev, dtype)
    add_bias = bias is not None and (method == "logit-adjust" or keep_bias)
    b = bias.detach().to(dev, dtype) if add_bias else None
    n, num_classes, n_tau = features.shape[0], w.shape[0], cols.shape[0]
    preds = torch.empty(n_tau, n, dtype=torch.int64, device=dev)
    # On the CPU the per-τ pass walks a cache-sized block; on a GPU the whole chunk at once.
    tau_rows = n if dev.type == "cuda" else max(1, _CPU_TAU_ELEMS // num_classes)
    for start in range(0, n, _MATMUL_ROWS):
        x = features[start : start + _MATMUL_ROWS].to(dev, dtype, non_blocking=True)
        dots = x @ w.T
        if method == "logit-adjust" and b is not None:
            dots += b
        buf = torch.empty(min(tau_rows, dots.shape[0]), num_classes, dtype=dtype, device=dev)
        for s in range(0, dots.shape[0], tau_rows):
            d = dots[s : s + tau_rows]
            z = buf[: d.shape[0]]
            for t in range(n_tau):
                if method == "logit-adjust":
                    torch.add(d, cols[t], out=z)
                elif b is not None:
                    torch.addcmul(b, d, cols[t], out=z)
                else:
                    torch.mul(d, cols[t], out=z)
                preds[t, start + s : start + s + d.shape[0]] = z.argmax(dim=1)
    return preds


def tau_sweep(
    features: torch.Tensor,
    labels: Any,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    train_counts: Any,
    taus: Sequence[float],
    method: str = "tau-norm",
    keep_bias: bool = False,
    many: float = 100,
    few: float = 20,
    device: Any = None,
) -> list[dict]:
    """Accuracy of every τ in `taus`: a list of {tau, overall, macro, many, medium, few}.

    tau-norm uses w_j / ‖w_j‖^τ, adding b_j only with keep_bias. logit-adjust shifts the joint
    logits (bias included whenever given; pass bias=None to drop it), keep_bias is ignored.
    device None: CUDA when available, else CPU. Values are fractions; a group with no class in
    `labels` gives None."""
    features, labels, counts = _validate(features, labels, weight, bias, train_counts, taus, method, many, few)
    columns = tau_columns(weight, counts, taus, method)
    preds = tau_predictions(features, weight, bias, columns, method, keep_bias, device)

    dev = preds.device
    lab = labels.to(dev)
    num_classes = weight.shape[0]
    correct = (preds == lab[None, :]).double()
    per_class_correct = torch.zeros(len(taus), num_classes, dtype=torch.float64, device=dev)
    per_class_correct.scatter_add_(1, lab[None, :].expand_as(correct), correct)
    n_eval = np.bincount(labels.numpy(), minlength=num_classes)
    present = n_eval > 0
    acc = np.divide(per_class_correct.cpu().numpy(), n_eval, out=np.zeros((len(taus), num_classes)), where=present)
    means = group_means(acc, present, shot_groups(counts, many, few))
    overall = (correct.sum(dim=1) / labels.shape[0]).cpu().tolist()
    return [
        {"tau": float(tau), "overall": overall[i], **{k: means[k][i] for k in ("macro",) + GROUP_NAMES}}
        for i, tau in enumerate(taus)
    ]


def pick_best(rows: Sequence[Mapping], metric: str = "overall") -> dict:
    """The row with the highest `metric`; ties go to higher overall accuracy, then smaller τ
    (the smaller change to the joint classifier)."""
    if metric not in METRICS:
        raise LtcliError(f"--metric: expected one of {', '.join(METRICS)}, got {metric!r}")
    if not rows:
        raise LtcliError("--grid: no τ values were evaluated")
    if any(r[metric] is None for r in rows):
        raise LtcliError(f"--metric {metric}: the tuning split has no class in the {metric} group")
    return dict(max(rows, key=lambda r: (r[metric], r["overall"], -r["tau"])))


def tau_table(rows: Sequence[Mapping], best_tau: float | None = None, title: str | None = None):
    """A rich Table of the sweep (τ, overall, macro, many, medium, few); the best row is bold."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("τ", justify="right")
    for col in ("overall", "macro", "many", "medium", "few"):
        table.add_column(col, justify="right")
    for r in rows:
        best = best_tau is not None and math.isclose(r["tau"], best_tau, rel_tol=0, abs_tol=1e-12)
        table.add_row(
            f"{r['tau']:g}" + (" ◀" if best else ""),
            *(_pct(r[k]) for k in ("overall", "macro", "many", "medium", "few")),
            style="bold green" if best else None,
        )
    return table

"""τ search for the τ-tunable heads, vectorised over the grid.

Each tunable head is a per-class rescaling or shift of the joint dot products d_j = w_jᵀf,
z_j(τ) = d_j · c_j(τ) (+ b_j) or d_j + b_j + c_j(τ), and declares its columns c(τ)
(`Head.sweep_terms`); so the expensive N x D x C product is computed ONCE (in row chunks on the device) and each
τ costs only an elementwise op and a max over a block that stays in cache. A 41-value grid
then costs about one evaluation instead of 41.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .errors import LtcliError
from .groups import GROUP_NAMES, shot_groups
from .metrics import fmt_pct, group_means
from .options import or_list
from .runtime import resolve_device

METRICS = ("overall", "macro", "many", "medium", "few")
# Rows per matmul chunk: bounds device memory for the dot products.
_MATMUL_ROWS = 8192


def tunable_head(method: str | None):
    """The head class whose τ is searched (default: the first tunable head)."""
    from .heads.registry import HEADS, tunable_methods

    names = tunable_methods()
    method = names[0] if method is None else method
    if method not in names:
        raise LtcliError(f"--method {method}: tune-tau supports {or_list(names, 'and')}")
    return HEADS[method]


def _validate(features, labels, weight, bias, train_counts, taus, many, few):
    if len(taus) == 0:
        raise LtcliError("--grid: no τ values")
    if any(not math.isfinite(float(t)) for t in taus):
        raise LtcliError("--grid: τ values must be finite")
    features = torch.as_tensor(features)
    weight = torch.as_tensor(weight)
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
    labels = torch.as_tensor(labels).reshape(-1).long().cpu()
    if labels.shape[0] != features.shape[0]:
        raise LtcliError(f"labels: {labels.shape[0]} labels for {features.shape[0]} feature rows")
    if labels.numel() == 0:
        raise LtcliError("features: no samples to evaluate")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise LtcliError(f"labels: class ids must lie in 0..{num_classes - 1}")
    shot_groups(counts, many, few)  # validates the thresholds
    return features, labels, counts


def _scores(d, c, b, additive, out=None):
    """z = d + c (logit-adjust; the bias is already in d), d * c, or b + d * c (tau-norm)."""
    if additive:
        return torch.add(d, c, out=out)
    if b is None:
        return torch.mul(d, c, out=out)
    return torch.addcmul(b, d, c, out=out)


@torch.no_grad()
def _grid_correct_cpu(d, y, cols, b, additive, block_elems=1 << 19) -> torch.Tensor:
    """T x R bool: is argmax_j z_j(τ) the label, for each τ (row of cols) and row of d.

    Exactly torch.argmax's answer (ties to the lowest class) without running argmax, which
    costs ~5x an elementwise op on the CPU: the label wins iff z_y beats the max of the other
    classes (a plain vectorised amax); on an exact tie, iff it has the lower index. Rows are
    walked in cache-sized blocks so each τ pass reads the block from cache."""
    block_rows = max(1, block_elems // d.shape[1])
    correct = torch.empty(cols.shape[0], d.shape[0], dtype=torch.bool)
    buf = torch.empty(min(block_rows, d.shape[0]), d.shape[1], dtype=d.dtype)
    for s in range(0, d.shape[0], block_rows):
        ds, ys = d[s : s + block_rows], y[s : s + block_rows, None]
        z = buf[: ds.shape[0]]
        for t in range(cols.shape[0]):
            _scores(ds, cols[t], b, additive, out=z)
            z_true = z.gather(1, ys).squeeze(1)  # read back from z: bit-identical to the row's entry
            z.scatter_(1, ys, float("-inf"))
            best_other = z.amax(dim=1)
            ok = z_true > best_other
            tied = (z_true == best_other).nonzero().squeeze(1)
            if tied.numel():  # rare: the label wins only if every tying class has a higher index
                ok[tied] = ys[tied, 0] < z[tied].argmax(dim=1)
            correct[t, s : s + ds.shape[0]] = ok
    return correct


@torch.no_grad()
def _grid_correct_batched(d, y, cols, b, additive, block_elems=1 << 26) -> torch.Tensor:
    """Same answer as _grid_correct_cpu, for a GPU: argmax is as cheap as max there, and
    several τ per kernel (a T' x R x C block) keep the launch count low. No host syncs."""
    per_tau = max(1, block_elems // d.numel())
    correct = torch.empty(cols.shape[0], d.shape[0], dtype=torch.bool, device=d.device)
    for t in range(0, cols.shape[0], per_tau):
        z = _scores(d[None], cols[t : t + per_tau, None, :], b, additive)
        correct[t : t + per_tau] = z.argmax(dim=2) == y[None, :]
    return correct


def tau_sweep(
    features: torch.Tensor,
    labels: Any,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    train_counts: Any,
    taus: Sequence[float],
    method: str | None = None,
    keep_bias: bool = False,
    many: float = 100,
    few: float = 20,
    device: Any = None,
) -> list[dict]:
    """Accuracy of every τ in `taus`: a list of {tau, overall, macro, many, medium, few}.

    tau-norm uses w_j / ‖w_j‖^τ, adding b_j only with keep_bias. logit-adjust shifts the joint
    logits (bias included whenever given; pass bias=None to drop it); keep_bias is ignored.
    Predictions are argmax with ties to the lowest class, as torch.argmax. device None: CUDA
    when available, else CPU. Values are fractions; a group with no class in `labels` is None."""
    head = tunable_head(method)
    features, labels, counts = _validate(features, labels, weight, bias, train_counts, taus, many, few)
    weight = torch.as_tensor(weight)
    bias = None if bias is None else torch.as_tensor(bias)
    dev = resolve_device(device)
    dtype = torch.float64 if torch.float64 in (features.dtype, weight.dtype) else torch.float32
    w = weight.detach().to(dev, dtype)
    options = {"keep_bias": keep_bias} if "keep_bias" in head.options_spec else {}
    cols, b, additive = head.sweep_terms(weight, bias, counts, taus, options)
    cols = cols.to(dev, dtype)
    # A huge τ makes ‖w_j‖^-τ overflow to inf or underflow to 0, which would silently tie classes.
    bad = ~torch.isfinite(cols).all(dim=1)
    if not additive:
        bad |= (cols == 0).any(dim=1)
    if bad.any():
        tau = taus[int(bad.nonzero()[0])]
        raise LtcliError(f"--grid: τ = {tau:g} overflows the per-class scaling in {dtype}; use smaller τ values")
    b = None if b is None else b.detach().to(dev, dtype)
    grid_correct = _grid_correct_cpu if dev.type == "cpu" else _grid_correct_batched

    num_classes = w.shape[0]
    per_class_correct = torch.zeros(len(taus), num_classes, dtype=torch.float64, device=dev)
    for start in range(0, features.shape[0], _MATMUL_ROWS):
        x = features[start : start + _MATMUL_ROWS].to(dev, dtype, non_blocking=True)
        y = labels[start : start + _MATMUL_ROWS].to(dev)
        dots = x @ w.T  # the one expensive product; every τ reuses it
        if not torch.isfinite(dots).all():
            raise LtcliError(f"features: NaN or inf in rows {start}..{start + x.shape[0] - 1}")
        if additive and b is not None:
            dots += b  # logit adjustment shifts the joint logits, bias included
        correct = grid_correct(dots, y, cols, None if additive else b, additive)
        per_class_correct.index_add_(1, y, correct.to(torch.float64))

    n_eval = np.bincount(labels.numpy(), minlength=num_classes)
    present = n_eval > 0
    pcc = per_class_correct.cpu().numpy()
    acc = np.divide(pcc, n_eval, out=np.zeros_like(pcc), where=present)
    means = group_means(acc, present, shot_groups(counts, many, few))
    overall = (pcc.sum(axis=1) / labels.shape[0]).tolist()
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


def grid_edge_note(rows: Sequence[Mapping], metric: str = "overall") -> str | None:
    """A hint when the best `metric` is reached at the largest τ of the grid: the optimum may
    lie beyond it (a memorising backbone can want τ > 2). None otherwise."""
    if len(rows) < 2:
        return None
    ordered = sorted(rows, key=lambda r: r["tau"])
    top, below = ordered[-1], ordered[-2]
    if top[metric] is None or top[metric] < max(r[metric] for r in rows if r[metric] is not None):
        return None
    step = top["tau"] - below["tau"]
    return (f"the best {metric} is reached at the largest τ of the grid ({top['tau']:g}); the optimum "
            f"may lie beyond it: try --grid {ordered[0]['tau']:g}:{2 * top['tau']:g}:{step:g}")


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
            *(fmt_pct(r[k]) for k in ("overall", "macro", "many", "medium", "few")),
            style="bold green" if best else None,
        )
    return table

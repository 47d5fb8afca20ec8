"""Metrics for long-tailed recognition: top-1/top-5, macro accuracy and shot groups.

Shot groups follow the official `shot_acc`: by TRAIN count, many > 100, medium 20..100,
few < 20 (thresholds configurable). Each group reports the mean of its per-class
accuracies, over the classes present in the evaluated labels. All values are fractions
in [0, 1]; tables render them as percentages.
"""

from __future__ import annotations

import csv
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .errors import LtcliError
from .groups import GROUP_NAMES, shot_groups
from .io import atomic_path

# Rows per chunk when ranking scores for top-5, bounding the N x C temporaries.
_CHUNK = 4096


def _to_numpy(x: Any, what: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as exc:
        raise LtcliError(f"{what}: not an array ({exc})") from None


def group_means(per_class_acc: np.ndarray, present: np.ndarray, groups: np.ndarray) -> dict:
    """macro / many / medium / few from per-class accuracies, over classes present in eval.

    `per_class_acc` may be C or T x C (one row per τ); a mean over no class is None."""
    acc = np.atleast_2d(per_class_acc)
    out: dict[str, list] = {}
    for name, mask in [("macro", present)] + [
        (g, present & (groups == i)) for i, g in enumerate(GROUP_NAMES)
    ]:
        out[name] = [None] * acc.shape[0] if not mask.any() else acc[:, mask].mean(axis=1).tolist()
    if np.ndim(per_class_acc) == 1:
        return {k: v[0] for k, v in out.items()}
    return out


def label_ranks(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Rank of the true label per sample (0 = top-1), ties broken by the lower class index.

    This is the order torch.argmax uses, so top-1 here agrees with argmax exactly, and
    top-k is deterministic even when scores tie (torch.topk's order on ties is not)."""
    ranks = torch.empty(labels.shape[0], dtype=torch.int64)
    cls = torch.arange(scores.shape[1])
    for s in range(0, scores.shape[0], _CHUNK):
        sc, lab = scores[s : s + _CHUNK], labels[s : s + _CHUNK]
        true = sc.gather(1, lab[:, None])
        ahead = (sc > true) | ((sc == true) & (cls[None, :] < lab[:, None]))
        ranks[s : s + _CHUNK] = ahead.sum(dim=1)
    return ranks


def _correct_and_top5(scores, labels_t: torch.Tensor, num_classes: int, ranks=None):
    """(top-1 correct per sample, top-5 accuracy or None) from N x C scores, N predictions, or
    the N label ranks (`label_ranks` chunk by chunk: no N x C matrix held)."""
    n = labels_t.shape[0]
    if ranks is not None:
        ranks = torch.as_tensor(ranks).reshape(-1)
        if ranks.shape[0] != n:
            raise LtcliError(f"ranks: {ranks.shape[0]} values for {n} labels")
        return ranks == 0, (float((ranks < 5).double().mean()) if num_classes >= 5 else None)
    scores_t = scores if isinstance(scores, torch.Tensor) else torch.as_tensor(_to_numpy(scores, "scores"))
    scores_t = scores_t.detach().cpu()
    if scores_t.ndim == 2:
        if scores_t.shape != (n, num_classes):
            raise LtcliError(
                f"scores: shape {tuple(scores_t.shape)} does not match {n} labels x {num_classes} classes"
            )
        check_scores(scores_t)
        ranks = label_ranks(scores_t, labels_t)
        correct = ranks == 0
        top5 = float((ranks < 5).double().mean()) if num_classes >= 5 else None
    elif scores_t.ndim == 1:
        if scores_t.shape[0] != n:
            raise LtcliError(f"predictions: {scores_t.shape[0]} values for {n} labels")
        correct = scores_t.long() == labels_t
        top5 = None
    else:
        raise LtcliError(f"scores: expected N x C scores or N predictions, got shape {tuple(scores_t.shape)}")

    return correct, top5


def checked_labels(labels: Any, num_classes: int) -> torch.Tensor:
    """Labels as an int64 vector of class ids in 0..C-1, or a one-line error."""
    labels_t = torch.as_tensor(_to_numpy(labels, "labels")).reshape(-1)
    if labels_t.numel() == 0:
        raise LtcliError("labels: no samples to evaluate")
    if labels_t.is_floating_point() or labels_t.dtype == torch.bool:
        raise LtcliError(f"labels: expected integer class ids, got {labels_t.dtype}")
    labels_t = labels_t.long()
    if int(labels_t.min()) < 0 or int(labels_t.max()) >= num_classes:
        raise LtcliError(
            f"labels: class ids must lie in 0..{num_classes - 1} "
            f"(found {int(labels_t.min())}..{int(labels_t.max())})"
        )
    return labels_t


def check_scores(scores: torch.Tensor) -> None:
    if scores.is_floating_point() and torch.isnan(scores).any():
        raise LtcliError("scores: contain NaN")


def compute_metrics(
    scores: Any,
    labels: Any,
    train_counts: Any,
    many: float = 100,
    few: float = 20,
    *,
    ranks: Any = None,
) -> dict:
    """Metrics of one head on one split.

    `scores` is N x C (higher = better) or a 1-D vector of predicted classes (then top5 is
    None); or None with `ranks`, the rank of each true label (`label_ranks`). Returns plain Python values (JSON-ready):
      overall (micro top-1), top5 (None when C < 5 or predictions given), macro, many,
      medium, few (None for a group with no class in the eval labels), n_samples, n_classes,
      thresholds, group_classes / group_eval_classes / group_samples (per group name),
      per_class: [{class, train_count, n_eval, correct, accuracy (None if n_eval 0), group}].
    """
    counts = _to_numpy(train_counts, "train_counts").astype(np.int64).reshape(-1)
    num_classes = counts.shape[0]
    labels_t = checked_labels(labels, num_classes)
    n = labels_t.shape[0]

    correct, top5 = _correct_and_top5(scores, labels_t, num_classes, ranks)

    lab = labels_t.numpy()
    n_eval = np.bincount(lab, minlength=num_classes)
    n_correct = np.bincount(lab, weights=correct.numpy().astype(np.float64), minlength=num_classes)
    n_correct = n_correct.astype(np.int64)
    present = n_eval > 0
    acc = np.divide(n_correct, n_eval, out=np.zeros(num_classes), where=present)
    groups = shot_groups(counts, many, few)

    out: dict[str, Any] = {
        "overall": float(correct.double().mean()),
        "top5": top5,
        **group_means(acc, present, groups),
        "n_samples": int(n),
        "n_classes": int(num_classes),
        "thresholds": {"many": many, "few": few},
    }
    out["group_classes"] = {g: int((groups == i).sum()) for i, g in enumerate(GROUP_NAMES)}
    out["group_eval_classes"] = {g: int((present & (groups == i)).sum()) for i, g in enumerate(GROUP_NAMES)}
    out["group_samples"] = {g: int(n_eval[groups == i].sum()) for i, g in enumerate(GROUP_NAMES)}
    out["per_class"] = [
        {
            "class": c,
            "train_count": int(counts[c]),
            "n_eval": int(n_eval[c]),
            "correct": int(n_correct[c]),
            "accuracy": float(acc[c]) if present[c] else None,
            "group": GROUP_NAMES[groups[c]],
        }
        for c in range(num_classes)
    ]
    return out


def fmt_pct(value: float | None) -> str:
    """A fraction as a percentage with one decimal; '–' for None."""
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def _num(x: float) -> str:
    return f"{x:g}"


def group_caption(metrics: Mapping) -> str:
    """'many 3 (>100), medium 4 (20-100), few 3 (<20) classes; 1,000 samples'."""
    t = metrics["thresholds"]
    sizes = metrics["group_classes"]
    many, few = _num(t["many"]), _num(t["few"])
    return (
        f"classes by train count: many {sizes['many']} (>{many}), medium {sizes['medium']} "
        f"({few}–{many}), few {sizes['few']} (<{few}); {metrics['n_samples']:,} samples"
    )


def metrics_table(rows: Mapping[str, Mapping], title: str | None = None):
    """A rich Table: one row per head, accuracies in percent; caption gives the group sizes."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("head", style="bold")
    for col in ("top-1", "top-5", "macro", "many", "medium", "few"):
        table.add_column(col, justify="right")
    for name, m in rows.items():
        table.add_row(
            name, fmt_pct(m["overall"]), fmt_pct(m.get("top5")), fmt_pct(m["macro"]),
            fmt_pct(m["many"]), fmt_pct(m["medium"]), fmt_pct(m["few"]),
        )
    if rows:
        table.caption = group_caption(next(iter(rows.values())))
    return table


def write_per_class_csv(
    path: str | os.PathLike,
    metrics_by_head: Mapping[str, Mapping],
    class_names: Sequence[str],
) -> None:
    """One row per class: class, name, train_count, group, n_eval, then one accuracy column
    per head (empty where the class has no eval sample). Written atomically."""
    if not metrics_by_head:
        raise LtcliError(f"{path}: no head to write per-class accuracy for")
    heads = list(metrics_by_head)
    first = metrics_by_head[heads[0]]["per_class"]
    if len(class_names) != len(first):
        raise LtcliError(f"{path}: {len(class_names)} class names for {len(first)} classes")
    for h in heads[1:]:
        if len(metrics_by_head[h]["per_class"]) != len(first):
            raise LtcliError(f"{path}: head {h!r} has a different number of classes")
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["class", "name", "train_count", "group", "n_eval", *heads])
            for c, base in enumerate(first):
                accs = []
                for h in heads:
                    a = metrics_by_head[h]["per_class"][c]["accuracy"]
                    accs.append("" if a is None else f"{a:.6f}")
                writer.writerow([c, class_names[c], base["train_count"], base["group"], base["n_eval"], *accs])

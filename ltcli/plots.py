"""PNG plots for reports: accuracy against τ, per-class accuracy, classifier weight norms.

Figures are built with matplotlib's object API on the Agg canvas (never pyplot), so no
display is needed, no global figure registry grows, and importing this module does not
change the backend of a program that imports ltcli. Files are written atomically.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import LtcliError
from .io import atomic_path

_GROUP_STYLE = {"overall": ("black", "-"), "many": ("tab:blue", "--"), "medium": ("tab:orange", "--"), "few": ("tab:red", "--")}


def _figure(width: float = 7.0, height: float = 4.5):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    return fig


def _finish(fig, ax, path: str | os.PathLike, xlabel: str, ylabel: str, title: str) -> None:
    """Labels, grid and legend every plot shares, then the atomic save."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    _save(fig, path)


def _save(fig, path: str | os.PathLike) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        # The temporary name ends in .tmp, so the format must be given explicitly.
        fig.savefig(tmp, format="png")


def _series(values: Sequence[Any]) -> np.ndarray:
    """Fractions (or None) -> percentages with NaN for None, so matplotlib leaves gaps."""
    return np.array([np.nan if v is None else 100.0 * v for v in values], dtype=float)


def _counts(train_counts: Any) -> np.ndarray:
    if hasattr(train_counts, "detach"):
        train_counts = train_counts.detach().cpu().numpy()
    return np.asarray(train_counts, dtype=np.int64).reshape(-1)


def plot_tau_curve(
    rows: Sequence[Mapping],
    best_tau: float | None,
    path: str | os.PathLike,
    title: str | None = None,
) -> None:
    """Accuracy (%) against τ for overall / many / medium / few, best τ marked."""
    if not rows:
        raise LtcliError(f"{path}: no τ values to plot")
    taus = np.array([r["tau"] for r in rows], dtype=float)
    order = np.argsort(taus)
    fig = _figure()
    ax = fig.add_subplot()
    for key, (color, style) in _GROUP_STYLE.items():
        y = _series([r.get(key) for r in rows])[order]
        if np.isnan(y).all():  # e.g. no few-shot class in the split
            continue
        ax.plot(taus[order], y, style, color=color, marker=".", label=key, linewidth=2 if key == "overall" else 1.3)
    if best_tau is not None:
        ax.axvline(best_tau, color="tab:green", linestyle=":", label=f"best τ = {best_tau:g}")
    _finish(fig, ax, path, "τ", "accuracy (%)", title or "accuracy against τ")


def plot_per_class_accuracy(
    metrics_by_head: Mapping[str, Mapping],
    train_counts: Any,
    path: str | os.PathLike,
    title: str | None = None,
    many: float = 100,
    few: float = 20,
) -> None:
    """Per-class accuracy (%) against train count (log x), one colour per head; shot
    thresholds drawn dashed. Classes with no train or eval sample are left out."""
    counts = _counts(train_counts)
    if not metrics_by_head:
        raise LtcliError(f"{path}: no head to plot")
    fig = _figure(8.0, 4.8)
    ax = fig.add_subplot()
    positive = counts[counts > 0]
    if positive.size == 0:
        raise LtcliError(f"{path}: every class has zero training samples; nothing to plot on a log axis")
    # Few classes (CIFAR-10): a line through every class. Many (ImageNet-LT): faint dots and a
    # line through the mean of log-spaced bins, or the heads' dots hide each other.
    few_classes = counts.size <= 50
    edges = np.geomspace(positive.min(), positive.max() * 1.0001, num=13)
    for i, (name, metrics) in enumerate(metrics_by_head.items()):
        per_class = metrics["per_class"]
        if len(per_class) != counts.size:
            raise LtcliError(f"{path}: head {name!r} has {len(per_class)} classes, train counts {counts.size}")
        acc = _series([c["accuracy"] for c in per_class])
        keep = (counts > 0) & ~np.isnan(acc)  # log axis; classes absent from the eval split
        color = f"C{i % 10}"
        if few_classes:
            order = np.argsort(counts[keep], kind="stable")
            ax.plot(counts[keep][order], acc[keep][order], "-o", color=color, markersize=4, label=name)
            continue
        ax.scatter(counts[keep], acc[keep], s=6, alpha=0.25, color=color, linewidths=0)
        centres, means = [], []
        for lo, hi in zip(edges[:-1], edges[1:]):
            sel = keep & (counts >= lo) & (counts < hi)
            if sel.any():
                centres.append(np.sqrt(lo * hi))
                means.append(acc[sel].mean())
        ax.plot(centres, means, "-", color=color, linewidth=2, label=f"{name} (bin mean)")
    for threshold in (few, many):
        ax.axvline(threshold, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_ylim(-3, 103)
    _finish(fig, ax, path, "training images in the class (log)", "per-class accuracy (%)",
            title or "per-class accuracy against train count")


def plot_weight_norms(
    norms_by_head: Mapping[str, Any],
    train_counts: Any,
    path: str | os.PathLike,
    title: str | None = None,
) -> None:
    """Classifier weight norm per class, classes sorted by train count (descending), one line
    per head; train counts on a second (log) axis in grey (Kang et al., Figure 2)."""
    counts = _counts(train_counts)
    if not norms_by_head:
        raise LtcliError(f"{path}: no head to plot")
    order = np.argsort(-counts, kind="stable")  # ties keep class order
    x = np.arange(counts.size)
    fig = _figure(8.0, 4.5)
    ax = fig.add_subplot()
    bars = ax.twinx()
    # A filled step outline draws 1,000 classes as fast as 10 (a bar per class does not).
    bars.fill_between(x, np.maximum(counts[order], 1), step="mid", color="lightgrey", alpha=0.6, linewidth=0)
    bars.set_yscale("log")
    bars.set_ylabel("training images (log)", color="grey")
    ax.set_zorder(bars.get_zorder() + 1)  # lines above the bars
    ax.patch.set_visible(False)
    for i, (name, norms) in enumerate(norms_by_head.items()):
        if hasattr(norms, "detach"):
            norms = norms.detach().cpu().numpy()
        norms = np.asarray(norms, dtype=float).reshape(-1)
        if norms.size != counts.size:
            raise LtcliError(f"{path}: head {name!r} has {norms.size} weight norms, train counts {counts.size}")
        ax.plot(x, norms[order], color=f"C{i % 10}", linewidth=1.5, label=name)
    ax.set_xlim(-0.5, counts.size - 0.5)
    _finish(fig, ax, path, "class index, sorted by training images (descending)", "weight norm ‖w_j‖",
            title or "classifier weight norm per class")

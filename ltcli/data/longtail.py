"""Long-tail profile and the seeded, order-independent selection of val and train images."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from ..errors import LtcliError


def longtail_counts(n_max: int, num_classes: int, imbalance_factor: float) -> list[int]:
    """Exponential profile n_i = int(n_max * IF ** (-i / (C - 1))), class 0 the largest."""
    if imbalance_factor < 1:
        raise LtcliError(f"--imbalance-factor {imbalance_factor:g}: must be >= 1")
    if num_classes <= 1:
        return [int(n_max)] * max(num_classes, 0)
    return [
        int(n_max * imbalance_factor ** (-i / (num_classes - 1))) for i in range(num_classes)
    ]


def rank_keys(keys: list[str], seed: int) -> np.ndarray:
    """A seeded pseudo-random uint64 per key: sha256 of f"{seed}:{key}".

    Depends on nothing but the key itself, so an image ranks the same whatever else is
    in the folder and in whatever order the folder lists."""
    out = np.empty(len(keys), dtype=np.uint64)
    prefix = f"{seed}:".encode()
    for i, key in enumerate(keys):
        out[i] = int.from_bytes(hashlib.sha256(prefix + key.encode()).digest()[:8], "big")
    return out


@dataclass
class Selection:
    train: np.ndarray          # positions kept for train, in source order
    val: np.ndarray            # positions held out for val, in source order
    train_counts: list[int]
    warnings: list[str]


def select(
    labels: np.ndarray,
    keys: list[str],
    class_names: list[str],
    seed: int,
    val_per_class: int = 0,
    imbalance_factor: float | None = None,
) -> Selection:
    """Hold out `val_per_class` images per class, then subsample train to the profile.

    Within each class images are ranked by `rank_keys`: val takes the K lowest ranks (but
    never a class's last image: min(K, n_j - 1)), train the next n_i. n_max is the largest
    class count left after the hold-out; a factor that would leave a class with no train
    image is refused."""
    labels = np.asarray(labels, dtype=np.int64)
    num_classes = len(class_names)
    if imbalance_factor is not None and not imbalance_factor >= 1:
        raise LtcliError(f"--imbalance-factor {imbalance_factor:g}: must be >= 1")
    if val_per_class < 0:
        raise LtcliError(f"--val-per-class {val_per_class}: must be >= 0")
    counts = np.bincount(labels, minlength=num_classes)
    # val never takes a class's last train image: min(K, n_j - 1) per class
    val_take = np.clip(np.minimum(val_per_class, counts - 1), 0, None)
    warnings = [
        f"class '{class_names[c]}': {val_take[c]} val image(s), not {val_per_class} (it has {counts[c]}; one stays "
        "for train)"
        for c in range(num_classes) if val_take[c] < val_per_class
    ]
    avail = counts - val_take
    if imbalance_factor is None:
        targets = avail
    else:
        n_max = int(avail.max())
        targets = np.array(longtail_counts(n_max, num_classes, imbalance_factor))
        if (targets < 1).any():
            c = int(np.flatnonzero(targets < 1)[0])
            raise LtcliError(
                f"--imbalance-factor {imbalance_factor:g}: leaves class '{class_names[c]}' with no train image "
                f"(n_max = {n_max}, so the factor can be at most {n_max})"
            )

    # rank of each image within its class: sort by (class, hash); lexsort is stable
    order = np.lexsort((rank_keys(keys, seed), labels))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(len(labels), dtype=np.int64)
    rank[order] = np.arange(len(labels)) - starts[labels[order]]

    val_mask = rank < val_take[labels]
    train_mask = ~val_mask & (rank < val_take[labels] + targets[labels])
    train_counts = np.minimum(avail, targets).astype(int).tolist()
    warnings += [
        f"class '{class_names[c]}': {avail[c]} train images, fewer than the profile's {targets[c]}"
        for c in range(num_classes)
        if avail[c] < targets[c]
    ]
    return Selection(np.flatnonzero(train_mask), np.flatnonzero(val_mask), train_counts, warnings)

"""Copy just the images a CIFAR-10-LT run uses into a smaller ImageFolder.

The device machine receives at most 64 MiB, so the full 50,000-image train folder cannot
travel. ltcli ranks each class's images by a seeded hash of their relative path, so a
folder holding only the selected images (val hold-out + long-tailed train) gives exactly
the same selection, counts and fingerprints as the full folder:

    python bench/make_cifar10_lt_subset.py ../shared/data/cifar10 .carry/cifar10lt \
        --imbalance-factor 100 --val-per-class 20 --seed 0
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from ltcli.data import DataConfig, load_dataset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--imbalance-factor", type=float, default=100)
    ap.add_argument("--val-per-class", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    src, dst = Path(args.src).resolve(), Path(args.dst)
    cfg = DataConfig(spec=f"imagefolder:{src}", seed=args.seed, imbalance_factor=args.imbalance_factor,
                     val_per_class=args.val_per_class)
    ds = load_dataset(cfg)
    copied = 0
    for name, split in ds.splits.items():
        for path in split.paths:
            rel = Path(path).resolve().relative_to(src)
            target = dst / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
            copied += 1
    check = load_dataset(DataConfig(spec=f"imagefolder:{dst.resolve()}", seed=args.seed,
                                    imbalance_factor=args.imbalance_factor, val_per_class=args.val_per_class))
    same = all(check.split(n).fingerprint() == s.fingerprint() for n, s in ds.splits.items())
    print(f"copied {copied} images; train counts {check.train_counts}; identical selection: {same}")
    if not same:
        raise SystemExit("the subset does not reproduce the selection")


if __name__ == "__main__":
    main()

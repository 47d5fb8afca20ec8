"""The real CIFAR-10 JPEG copy in ../shared/data/cifar10 (skipped when absent)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ltcli.data import DataConfig, decode_split, load_dataset

CIFAR10_JPEG = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10").resolve()

pytestmark = [
    pytest.mark.realdata,
    pytest.mark.skipif(not (CIFAR10_JPEG / "train").is_dir(), reason=f"{CIFAR10_JPEG} absent"),
]


def test_cifar10_lt_if100_literature_counts():
    ds = load_dataset(DataConfig(spec=f"imagefolder:{CIFAR10_JPEG}", imbalance_factor=100))
    expected = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert ds.class_names[:3] == ["airplane", "automobile", "bird"]
    assert ds.train_counts == expected and sum(expected) == 12406
    assert np.bincount(ds.split("train").labels).tolist() == expected
    assert list(ds.splits) == ["train", "test"]


def test_cifar10_lt_if100_val20():
    """20 per class are held out first, so n_max = 4980 and the profile scales from there
    (5000 train + 20 val for class 0 cannot come out of 5000 images)."""
    ds = load_dataset(DataConfig(spec=f"imagefolder:{CIFAR10_JPEG}", imbalance_factor=100, val_per_class=20))
    expected = [4980, 2985, 1789, 1072, 643, 385, 231, 138, 83, 49]
    assert ds.train_counts == expected and sum(expected) == 12355
    assert np.bincount(ds.split("train").labels).tolist() == expected
    assert np.bincount(ds.split("val").labels).tolist() == [20] * 10
    assert np.bincount(ds.split("test").labels).tolist() == [1000] * 10
    assert not set(ds.split("train").keys) & set(ds.split("val").keys)
    assert ds.warnings == []
    # decoding a slice of the real JPEGs gives 32x32 uint8 images
    x, kept = decode_split(ds.split("val").subset(range(0, 200, 10)), None, False, 2)
    assert tuple(x.shape) == (20, 3, 32, 32) and len(kept) == 20 and x.float().std() > 20

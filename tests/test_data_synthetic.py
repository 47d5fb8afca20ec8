"""The built-in `synthetic` data: shapes, counts, determinism, and that it carries signal."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from ltcli.data import DataConfig, decode_split, load_dataset
from ltcli.errors import LtcliError


def test_default_layout():
    t = time.perf_counter()
    ds = load_dataset(DataConfig())
    assert time.perf_counter() - t < 20  # generated, never downloaded (about a second idle)
    assert ds.spec == "synthetic" and ds.native_size == 32
    assert ds.class_names == [f"class_{i:02d}" for i in range(10)]
    assert ds.train_counts == [500, 299, 179, 107, 64, 38, 23, 13, 8, 5]
    assert list(ds.splits) == ["train", "val", "test"]
    for name, per_class in (("train", ds.train_counts), ("val", [20] * 10), ("test", [100] * 10)):
        split = ds.split(name)
        assert split.paths is None and split.images.dtype == np.uint8
        assert split.images.shape == (sum(per_class), 32, 32, 3)
        assert np.bincount(split.labels, minlength=10).tolist() == per_class
    img = ds.split("test").load(0)
    assert img.size == (32, 32) and img.mode == "RGB"


def test_deterministic_per_seed():
    a, b = load_dataset(DataConfig()), load_dataset(DataConfig())
    c = load_dataset(DataConfig(seed=1))
    for name in ("train", "val", "test"):
        assert np.array_equal(a.split(name).images, b.split(name).images)
        assert a.split(name).fingerprint() == b.split(name).fingerprint()
        assert a.split(name).fingerprint() != c.split(name).fingerprint()
    # val, test and train are different images
    fps = {a.split(n).fingerprint() for n in ("train", "val", "test")}
    assert len(fps) == 3


def test_options():
    ds = load_dataset(DataConfig(num_classes=5, image_size=16, imbalance_factor=10, val_per_class=3,
                                 synthetic_max_per_class=40, synthetic_test_per_class=7))
    assert ds.train_counts == [40, 22, 12, 7, 4] and ds.num_classes == 5
    assert ds.split("train").images.shape[1:] == (16, 16, 3)
    assert len(ds.split("val")) == 15 and len(ds.split("test")) == 35
    x, kept = decode_split(ds.split("test"), None, False, 0)
    assert tuple(x.shape) == (35, 3, 16, 16) and len(kept) == 35
    names = load_dataset(DataConfig(num_classes=120, synthetic_max_per_class=2,
                                    synthetic_test_per_class=0, synthetic_val_per_class=0)).class_names
    assert names[0] == "class_000" and names[-1] == "class_119"
    with pytest.raises(LtcliError, match="--imbalance-factor"):
        load_dataset(DataConfig(imbalance_factor=0.9))
    with pytest.raises(LtcliError, match="--synthetic-classes 1"):
        load_dataset(DataConfig(num_classes=1))


def _ridge_probe_accuracy(train_x, train_y, test_x, test_y, classes):
    """Ridge regression onto one-hot labels from 4x4-pooled pixels: a cheap linear probe."""
    def feats(x):
        t = torch.from_numpy(x).permute(0, 3, 1, 2).double() / 255
        return torch.nn.functional.avg_pool2d(t, 4).flatten(1)
    xtr, xte = feats(train_x), feats(test_x)
    mu = xtr.mean(0)
    xtr, xte = xtr - mu, xte - mu
    onehot = torch.nn.functional.one_hot(torch.from_numpy(train_y), classes).double()
    w = torch.linalg.solve(xtr.T @ xtr + 1.0 * torch.eye(xtr.shape[1], dtype=torch.double), xtr.T @ onehot)
    return ((xte @ w).argmax(1).numpy() == test_y).mean()


def test_classes_carry_signal_but_are_not_trivial():
    """Balanced 100 per class: pooled pixels + a linear model are far above chance (the
    classes are learnable) yet far from perfect (a CNN's features are needed)."""
    ds = load_dataset(DataConfig(imbalance_factor=1, synthetic_max_per_class=100))
    acc = _ridge_probe_accuracy(ds.split("train").images, ds.split("train").labels,
                                 ds.split("test").images, ds.split("test").labels, 10)
    assert 0.3 < acc < 0.9, acc

"""cifar10 / cifar100 read offline from a tiny fixture in torchvision's python-pickle format.

torchvision checks each file's md5 against the real CIFAR archives; the fixture's files are
not those, so the tests patch the expected md5s (class attributes of torchvision's CIFAR
classes) to the fixture's own. ltcli's loader itself runs unchanged, integrity check included."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torchvision

from ltcli.data import DataConfig, decode_split, load_dataset
from ltcli.errors import LtcliError

CIFAR10, CIFAR100 = torchvision.datasets.CIFAR10, torchvision.datasets.CIFAR100


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _write_batch(path: Path, data: np.ndarray, labels: list[int], label_key: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        pickle.dump({"data": data.reshape(len(data), -1), label_key: labels}, fh)
    return _md5(path)


def make_cifar10(root: Path, per_batch: int, monkeypatch) -> np.ndarray:
    """Five train batches + test batch + meta; returns the train images (N, 32, 32, 3)."""
    folder = root / CIFAR10.base_folder
    rng = np.random.default_rng(0)
    train_list, all_imgs = [], []
    for b in range(1, 6):
        chw = rng.integers(0, 256, (per_batch, 3, 32, 32), dtype=np.uint8)
        labels = [(b * per_batch + i) % 10 for i in range(per_batch)]
        train_list.append([f"data_batch_{b}", _write_batch(folder / f"data_batch_{b}", chw, labels, "labels")])
        all_imgs.append(chw.transpose(0, 2, 3, 1))
    test_md5 = _write_batch(folder / "test_batch", rng.integers(0, 256, (20, 3, 32, 32), dtype=np.uint8),
                            [i % 10 for i in range(20)], "labels")
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": names}, fh)
    monkeypatch.setattr(CIFAR10, "train_list", train_list)
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", test_md5]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": _md5(folder / "batches.meta")})
    return np.concatenate(all_imgs)


@pytest.fixture
def no_download(monkeypatch):
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", refuse)
    return calls


def test_cifar10_offline_from_spec_root(tmp_path, monkeypatch, no_download):
    train_imgs = make_cifar10(tmp_path / "c10", per_batch=30, monkeypatch=monkeypatch)
    ds = load_dataset(DataConfig(spec=f"cifar10:{tmp_path / 'c10'}", imbalance_factor=3, val_per_class=2))
    assert no_download == []
    assert ds.class_names[0] == "airplane" and ds.num_classes == 10 and ds.native_size == 32
    # 15 per class, 2 held out: n_max 13, profile int(13 * 3 ** (-i / 9))
    assert ds.train_counts == [13, 11, 10, 9, 7, 7, 6, 5, 4, 4]
    assert len(ds.split("val")) == 20 and len(ds.split("test")) == 20
    tr = ds.split("train")
    assert tr.paths is None and tr.images.shape[1:] == (32, 32, 3)
    # selected images are the fixture's own pixels under their own labels
    first = int(tr.keys[0][1:])
    assert np.array_equal(tr.images[0], train_imgs[first]) and tr.labels[0] == first % 10
    x, kept = decode_split(tr, None, False, 0)
    assert tuple(x.shape) == (len(tr), 3, 32, 32) and len(kept) == len(tr)
    assert tr.load(0).size == (32, 32)


def test_cifar10_offline_from_env(tmp_path, monkeypatch, no_download):
    make_cifar10(tmp_path / "home", per_batch=10, monkeypatch=monkeypatch)
    monkeypatch.setenv("LTCLI_DATA_HOME", str(tmp_path / "home"))
    ds = load_dataset(DataConfig(spec="cifar10"))
    assert len(ds.split("train")) == 50 and ds.train_counts == [5] * 10 and no_download == []
    # content fingerprint: a different selection of the same pixels differs
    assert ds.split("train").fingerprint() != load_dataset(DataConfig(spec="cifar10", imbalance_factor=2)).split("train").fingerprint()


def test_cifar100_offline(tmp_path, monkeypatch, no_download):
    folder = tmp_path / CIFAR100.base_folder
    rng = np.random.default_rng(1)
    tr = _write_batch(folder / "train", rng.integers(0, 256, (200, 3, 32, 32), dtype=np.uint8),
                      [i % 100 for i in range(200)], "fine_labels")
    te = _write_batch(folder / "test", rng.integers(0, 256, (100, 3, 32, 32), dtype=np.uint8),
                      list(range(100)), "fine_labels")
    with open(folder / "meta", "wb") as fh:
        pickle.dump({"fine_label_names": [f"n{i}" for i in range(100)]}, fh)
    monkeypatch.setattr(CIFAR100, "train_list", [["train", tr]])
    monkeypatch.setattr(CIFAR100, "test_list", [["test", te]])
    monkeypatch.setattr(CIFAR100, "meta", {**CIFAR100.meta, "md5": _md5(folder / "meta")})
    ds = load_dataset(DataConfig(spec=f"cifar100:{tmp_path}"))
    assert ds.num_classes == 100 and ds.class_names[99] == "n99" and ds.train_counts == [2] * 100


def test_cifar_missing_and_download_fails(tmp_path, no_download):
    with pytest.raises(LtcliError) as err:
        load_dataset(DataConfig(spec=f"cifar10:{tmp_path / 'empty'}"))
    msg = str(err.value)
    assert msg.startswith(str(tmp_path / "empty" / "cifar-10-batches-py"))
    assert "download failed (network unreachable)" in msg and "\n" not in msg
    assert len(no_download) == 1  # a download is tried only because the files are missing

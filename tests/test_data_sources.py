"""imagefolder / list / inat sources, val hold-out, long-tail selection, fingerprints, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ltcli.data import DataConfig, load_dataset
from ltcli.errors import LtcliError


def write_image(path: Path, seed: int, size: int = 8, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path, format=fmt)


def make_imagefolder(root: Path, counts: dict[str, int], splits=("train",), ext=".png") -> Path:
    for split in splits:
        for c, (name, n) in enumerate(counts.items()):
            for i in range(n):
                write_image(root / split / name / f"img{i:03d}{ext}", seed=c * 1000 + i)
    return root


def load(spec, **kw):
    return load_dataset(DataConfig(spec=spec, **kw))


# ---- imagefolder -------------------------------------------------------------------------

def test_imagefolder_lists_classes_and_splits(tmp_path):
    root = make_imagefolder(tmp_path / "d", {"b_cls": 3, "a_cls": 2}, splits=("train", "test"))
    (root / "train" / "a_cls" / "notes.txt").write_text("not an image")
    write_image(root / "train" / "a_cls" / "sub" / "deep.JPG", 5, fmt="JPEG")  # recursive, any case
    ds = load(f"imagefolder:{root}")
    assert ds.class_names == ["a_cls", "b_cls"]
    assert list(ds.splits) == ["train", "test"]
    train = ds.split("train")
    assert train.keys == ["a_cls/img000.png", "a_cls/img001.png", "a_cls/sub/deep.JPG",
                          "b_cls/img000.png", "b_cls/img001.png", "b_cls/img002.png"]
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert ds.train_counts == [3, 3] and ds.num_classes == 2
    assert all(Path(p).is_absolute() or Path(p).exists() for p in train.paths)
    assert train.load(2).mode == "RGB"
    with pytest.raises(LtcliError, match=r"^--split val: data 'imagefolder:.*' has no val split \(has: train, test\)$"):
        ds.split("val")


@pytest.mark.parametrize(
    "setup, pattern",
    [
        (lambda r: None, r"data root not found"),
        (lambda r: r.mkdir(), r"data root is empty"),
        (lambda r: (r / "test").mkdir(parents=True), r"/train: not found"),
        (lambda r: (r / "train").mkdir(parents=True), r"/train: no class folders"),
        (lambda r: ((r / "train" / "cat").mkdir(parents=True), (r / "train" / "cat" / "x.txt").write_text("x")),
         r"/train/cat: class folder holds no images"),
    ],
)
def test_imagefolder_errors(tmp_path, setup, pattern):
    root = tmp_path / "d"
    setup(root)
    with pytest.raises(LtcliError, match=pattern) as err:
        load(f"imagefolder:{root}")
    assert "\n" not in str(err.value)


def test_imagefolder_unknown_test_class(tmp_path):
    root = make_imagefolder(tmp_path / "d", {"a": 2})
    write_image(root / "test" / "zebra" / "x.png", 0)
    with pytest.raises(LtcliError, match=r"test/zebra: class 'zebra' is not in"):
        load(f"imagefolder:{root}")


# ---- selection: val hold-out + long tail --------------------------------------------------

def test_val_holdout_and_profile(tmp_path):
    root = make_imagefolder(tmp_path / "d", {f"c{i}": 24 for i in range(4)}, splits=("train", "test"))
    ds = load(f"imagefolder:{root}", imbalance_factor=10, val_per_class=4)
    # n_max = 24 - 4 = 20; n_i = int(20 * 10 ** (-i / 3))
    assert ds.train_counts == [20, 9, 4, 2]
    assert np.bincount(ds.split("train").labels).tolist() == [20, 9, 4, 2]
    assert np.bincount(ds.split("val").labels).tolist() == [4, 4, 4, 4]
    assert list(ds.splits) == ["train", "val", "test"]
    assert not set(ds.split("train").keys) & set(ds.split("val").keys)
    assert len(ds.split("test")) == 96  # test stays balanced and complete
    # seeded: same seed same choice, other seed other choice
    again = load(f"imagefolder:{root}", imbalance_factor=10, val_per_class=4)
    other = load(f"imagefolder:{root}", imbalance_factor=10, val_per_class=4, seed=1)
    assert again.split("train").keys == ds.split("train").keys
    assert other.split("val").keys != ds.split("val").keys
    assert other.split("train").fingerprint() != ds.split("train").fingerprint()
    assert again.split("train").fingerprint() == ds.split("train").fingerprint()


def test_selection_is_stable_on_subsets(tmp_path):
    """A folder holding only the n_i + K first-ranked images of each class selects exactly the
    same images (the GPU benchmark ships such a subset)."""
    full = make_imagefolder(tmp_path / "full", {f"c{i}": 30 for i in range(5)}, splits=("train",))
    cfg = dict(imbalance_factor=8, val_per_class=3, seed=7)
    ds = load(f"imagefolder:{full}", **cfg)
    sub = tmp_path / "sub"
    for key in ds.split("train").keys + ds.split("val").keys:
        (sub / "train" / key).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(full / "train" / key, sub / "train" / key)  # same size and time: same fingerprint
    ds_sub = load(f"imagefolder:{sub}", **cfg)
    assert ds_sub.train_counts == ds.train_counts
    for name in ("train", "val"):
        assert ds_sub.split(name).keys == ds.split(name).keys
        assert ds_sub.split(name).fingerprint() == ds.split(name).fingerprint()


def test_selection_ignores_listing_order(tmp_path):
    root = tmp_path / "r"
    (root / "imgs").mkdir(parents=True)
    lines = []
    for i in range(40):
        write_image(root / "imgs" / f"{i}.png", i)
        lines.append(f"imgs/{i}.png {i % 2}")
    (tmp_path / "a.txt").write_text("\n".join(lines))
    (tmp_path / "b.txt").write_text("\n".join(reversed(lines)))
    cfg = dict(imbalance_factor=4, val_per_class=2)
    a = load(f"list:{root}:{tmp_path / 'a.txt'}", **cfg)
    b = load(f"list:{root}:{tmp_path / 'b.txt'}", **cfg)
    assert sorted(a.split("train").keys) == sorted(b.split("train").keys)
    assert sorted(a.split("val").keys) == sorted(b.split("val").keys)
    assert a.train_counts == b.train_counts == [18, 4]


def test_short_class_keeps_what_it_has_and_warns(tmp_path):
    # class c2 has 3 images but the profile asks int(10 * 2 ** -1) = 5 of it
    root = make_imagefolder(tmp_path / "d", {"c0": 10, "c1": 10, "c2": 3})
    ds = load(f"imagefolder:{root}", imbalance_factor=2)
    assert ds.train_counts == [10, 7, 3]
    assert len(ds.warnings) == 1 and "'c2'" in ds.warnings[0]


def test_selection_option_errors(tmp_path):
    root = make_imagefolder(tmp_path / "d", {"big": 6, "small": 2})
    ds = load(f"imagefolder:{root}", val_per_class=2)  # val never takes a class's last image
    assert ds.train_counts == [4, 1] and len(ds.split("val")) == 3
    assert any("'small'" in w and "one stays for train" in w for w in ds.warnings)
    with pytest.raises(LtcliError, match=r"^--imbalance-factor 7: leaves class 'small' with no train image "
                                         r"\(n_max = 6, so the factor can be at most 6\)"):
        load(f"imagefolder:{root}", imbalance_factor=7)
    for bad in (0.5, 0, -3, float("nan")):
        with pytest.raises(LtcliError, match=r"^--imbalance-factor .*must be a finite number >= 1"):
            load(f"imagefolder:{root}", imbalance_factor=bad)
    with pytest.raises(LtcliError, match=r"^--val-per-class -1"):
        load(f"imagefolder:{root}", val_per_class=-1)
    make_imagefolder(root, {"big": 1, "small": 1}, splits=("val",))
    with pytest.raises(LtcliError, match=r"^--val-per-class 1: .*already has a val split"):
        load(f"imagefolder:{root}", val_per_class=1)


def test_fingerprint_tracks_paths_and_labels(tmp_path):
    root = make_imagefolder(tmp_path / "d", {"a": 3, "b": 3})
    ds = load(f"imagefolder:{root}")
    tr = ds.split("train")
    fp = tr.fingerprint()
    assert len(fp) == 64 and fp == load(f"imagefolder:{root}").split("train").fingerprint()
    assert tr.subset(range(5)).fingerprint() != fp
    relabel = tr.subset(range(6))
    relabel.labels[0] = 1
    assert relabel.fingerprint() != fp
    # the same relative layout elsewhere is the same data
    shutil.copytree(root, tmp_path / "moved")
    assert load(f"imagefolder:{tmp_path / 'moved'}").split("train").fingerprint() == fp
    assert ds.fingerprint() != load(f"imagefolder:{root}", val_per_class=1).fingerprint()


# ---- list files ----------------------------------------------------------------------------

def make_list_root(tmp_path: Path, n: int = 12, classes: int = 3) -> tuple[Path, list[str]]:
    root = tmp_path / "root"
    lines = []
    for i in range(n):
        write_image(root / "train" / f"{i:02d}.jpg", i, fmt="JPEG")
        lines.append(f"train/{i:02d}.jpg {i % classes}")
    return root, lines


def test_list_three_files(tmp_path, monkeypatch):
    root, lines = make_list_root(tmp_path)
    (tmp_path / "tr.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "va.txt").write_text("\n".join(lines[:3]))
    (tmp_path / "te.txt").write_text("\n".join(lines[3:9]))
    monkeypatch.chdir(tmp_path)  # list paths are relative to the cwd
    ds = load("list:root:tr.txt,va.txt,te.txt")
    assert ds.class_names == ["class_0", "class_1", "class_2"]
    assert [len(ds.split(s)) for s in ("train", "val", "test")] == [12, 3, 6]
    assert ds.split("train").keys[0] == "train/00.jpg"
    assert ds.split("train").paths[0] == str(root / "train" / "00.jpg")
    assert ds.split("test").load(0).size == (8, 8)
    only_test = load("list:root:tr.txt,,te.txt")
    assert list(only_test.splits) == ["train", "test"]


def test_list_classnames_file(tmp_path):
    root, lines = make_list_root(tmp_path, classes=2)
    (root / "classnames.txt").write_text("cat\ndog\nemu\n")
    (tmp_path / "tr.txt").write_text("\n".join(lines[:-1] + ["train/11.jpg 2"]))
    ds = load(f"list:{root}:{tmp_path / 'tr.txt'}")
    assert ds.class_names == ["cat", "dog", "emu"] and ds.train_counts == [6, 5, 1]
    (tmp_path / "tr.txt").write_text("\n".join(lines + ["train/00.jpg 3"]))
    with pytest.raises(LtcliError, match=r"tr\.txt:13: label 3 out of range .*classnames\.txt names 3 classes"):
        load(f"list:{root}:{tmp_path / 'tr.txt'}")


@pytest.mark.parametrize(
    "train_lines, test_lines, pattern",
    [
        (["a.jpg 0", "b.jpg"], None, r"tr\.txt:2: expected 'path label'"),
        (["a.jpg 0", "", "b.jpg x1"], None, r"tr\.txt:3: expected 'path label'"),
        (["a.jpg -2"], None, r"tr\.txt:1: label -2 is negative"),
        (["a.jpg 0", "b.jpg 1"], ["c.jpg 2"], r"te\.txt:1: label 2 out of range \(the train list's labels run 0\.\.1\)"),
        (["a.jpg 0", "b.jpg 2"], None, r"tr\.txt: class 1 \('class_1'\) has no train images"),
        (["../../etc/x.jpg 0"], None, r"tr\.txt:1: path '\.\./\.\./etc/x\.jpg' lies outside the data root"),
        (["/etc/x.jpg 0"], None, r"tr\.txt:1: path '/etc/x\.jpg' lies outside the data root"),
        ([], None, r"tr\.txt: list file holds no images"),
    ],
)
def test_list_errors(tmp_path, train_lines, test_lines, pattern):
    root = tmp_path / "root"
    write_image(root / "a.jpg", 0)
    (tmp_path / "tr.txt").write_text("\n".join(train_lines))
    spec = f"list:{root}:{tmp_path / 'tr.txt'}"
    if test_lines is not None:
        (tmp_path / "te.txt").write_text("\n".join(test_lines))
        spec += f",,{tmp_path / 'te.txt'}"
    with pytest.raises(LtcliError, match=pattern) as err:
        load(spec)
    assert "\n" not in str(err.value)


def test_list_missing_files_and_outside_root_option(tmp_path):
    root = tmp_path / "root"
    write_image(root / "a.jpg", 0)
    write_image(tmp_path / "outside.jpg", 1)
    with pytest.raises(LtcliError, match=r"nope\.txt: list file not found"):
        load(f"list:{root}:{tmp_path / 'nope.txt'}")
    with pytest.raises(LtcliError, match=r"data root not found"):
        load(f"list:{tmp_path / 'nowhere'}:{tmp_path / 'nope.txt'}")
    (tmp_path / "tr.txt").write_bytes(b"a.jpg 0\n\xff\xfe 1\n")
    with pytest.raises(LtcliError, match=r"tr\.txt: not UTF-8"):
        load(f"list:{root}:{tmp_path / 'tr.txt'}")
    (tmp_path / "tr.txt").write_text("a.jpg 0\n../outside.jpg 1\n")
    ds = load(f"list:{root}:{tmp_path / 'tr.txt'}", allow_outside_root=True)
    assert ds.split("train").load(1).size == (8, 8)


# ---- iNaturalist ---------------------------------------------------------------------------

def write_inat(root: Path, split: str, items: list[tuple[str, int]], cats: list[int]) -> None:
    images = [{"id": 100 + i, "file_name": f} for i, (f, _) in enumerate(items)]
    anns = [{"id": i, "image_id": 100 + i, "category_id": c} for i, (_, c) in enumerate(items)]
    categories = [{"id": c, "name": f"species {c}", "supercategory": "Plantae"} for c in cats]
    for f, _ in items:
        write_image(root / f, hash(f) % 1000)
    (root / f"{split}2018.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))


def test_inat_train_and_val_as_test(tmp_path):
    root = tmp_path / "inat"
    cats = [0, 1, 2]
    train = [(f"train_val2018/P/{c}/{i}.jpg", c) for c in cats for i in range(6 - c)]
    write_inat(root, "train", train, cats)
    write_inat(root, "val", [(f"train_val2018/P/{c}/v{c}.jpg", c) for c in cats], cats)
    ds = load(f"inat:{root}", val_per_class=1)
    assert ds.class_names == ["species 0", "species 1", "species 2"]
    assert list(ds.splits) == ["train", "val", "test"]
    assert ds.train_counts == [5, 4, 3] and len(ds.split("test")) == 3
    assert ds.split("test").keys[0] == "train_val2018/P/0/v0.jpg"
    assert ds.split("train").load(0).mode == "RGB"


def test_inat_errors(tmp_path):
    root = tmp_path / "inat"
    root.mkdir()
    (root / "x").write_text("")
    with pytest.raises(LtcliError, match=r"train2018\.json: not found"):
        load(f"inat:{root}")
    (root / "train2018.json").write_text("{not json")
    with pytest.raises(LtcliError, match=r"train2018\.json: not valid JSON"):
        load(f"inat:{root}")
    (root / "train2018.json").write_text(json.dumps({"images": []}))
    with pytest.raises(LtcliError, match=r"train2018\.json: expected a COCO-style object"):
        load(f"inat:{root}")
    write_inat(root, "train", [("a.jpg", 0)], [0])
    doc = json.loads((root / "train2018.json").read_text())
    doc["annotations"][0]["image_id"] = 5
    (root / "train2018.json").write_text(json.dumps(doc))
    with pytest.raises(LtcliError, match=r"unknown image id 5"):
        load(f"inat:{root}")


# ---- Split.load on bad files ---------------------------------------------------------------

def test_load_names_a_corrupt_or_missing_file(tmp_path):
    root = make_imagefolder(tmp_path / "d", {"a": 3, "b": 1})
    bad = root / "train" / "a" / "img001.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    trunc = root / "train" / "a" / "img002.png"
    trunc.write_bytes(trunc.read_bytes()[:60])
    ds = load(f"imagefolder:{root}")  # listing does not decode
    tr = ds.split("train")
    assert tr.load(0).size == (8, 8)
    for i, path in ((1, bad), (2, trunc)):
        with pytest.raises(LtcliError, match=rf"^{path}: cannot read image"):
            tr.load(i)
    trunc.unlink()
    with pytest.raises(LtcliError, match=rf"^{trunc}: image not found$"):
        tr.load(2)

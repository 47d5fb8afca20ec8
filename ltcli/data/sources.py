"""One loader per data kind: each lists what the data holds, without decoding any image."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import LtcliError
from ..io import check_regular_file
from .listfile import read_list_file, resolve_entry
from .spec import LIST_SPLITS, DataSpec
from .types import Split

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass
class Source:
    class_names: list[str]
    splits: dict[str, Split]
    native_size: int | None = None


def _check_root(root: str, spec: str) -> Path:
    path = Path(root)
    if not path.exists():
        raise LtcliError(f"{root}: data root not found (--data {spec})")
    if not path.is_dir():
        raise LtcliError(f"{root}: data root is not a directory (--data {spec})")
    try:
        empty = next(path.iterdir(), None) is None
    except OSError as exc:
        raise LtcliError(f"{root}: cannot read data root ({exc.strerror or exc})") from None
    if empty:
        raise LtcliError(f"{root}: data root is empty (--data {spec})")
    return path


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _list_images(folder: Path, data_root: Path) -> list[str]:
    """Image files under `folder` (recursively), as sorted posix paths relative to it.

    Symlinks are followed, but one that resolves into the data root outside its own class
    folder (to another class, another split, the root itself) is refused: it would pull
    other images into this class. Links to storage outside the data root are fine."""
    found = []
    seen: set[tuple[int, int]] = set()   # (device, inode) of every folder listed: cuts symlink loops
    # the class folder where it stands (a class folder that is itself a link is judged by its target)
    own = os.path.join(os.path.realpath(folder.parent), folder.name)
    root = os.path.realpath(data_root)

    def check(p: str) -> None:
        real = os.path.realpath(p)
        if _inside(real, root) and not _inside(real, own):
            raise LtcliError(f"{p}: a symlink that leads out of its class folder {folder} (to {real}); "
                             "it would mix other images into this class")

    for dirpath, dirnames, filenames in os.walk(folder, onerror=None, followlinks=True):
        check(dirpath)
        try:
            st = os.stat(dirpath)
        except OSError:
            dirnames[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = os.path.relpath(dirpath, folder)
        for name in filenames:
            if _is_image(name):
                check(os.path.join(dirpath, name))
                found.append(name if rel_dir == "." else f"{rel_dir}/{name}".replace(os.sep, "/"))
    return sorted(found)


def _class_dirs(split_dir: Path) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    except OSError as exc:
        raise LtcliError(f"{split_dir}: cannot list ({exc.strerror or exc})") from None


def load_imagefolder(ds: DataSpec, spec: str) -> Source:
    """ROOT/train/<class>/* (classes = sorted train subfolders), optional ROOT/val, ROOT/test."""
    root = _check_root(ds.root, spec)
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise LtcliError(f"{train_dir}: not found (imagefolder expects ROOT/train/<class>/<images>)")
    class_names = _class_dirs(train_dir)
    if not class_names:
        raise LtcliError(f"{train_dir}: no class folders (expected ROOT/train/<class>/<images>)")
    index = {name: i for i, name in enumerate(class_names)}
    splits = {}
    for split in LIST_SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        keys, paths, labels = [], [], []
        for name in _class_dirs(split_dir):
            if name not in index:
                raise LtcliError(f"{split_dir / name}: class '{name}' is not in {train_dir}")
            files = _list_images(split_dir / name, root)
            if not files:
                raise LtcliError(
                    f"{split_dir / name}: class folder holds no images ({' '.join(IMAGE_EXTENSIONS)})"
                )
            for f in files:
                keys.append(f"{name}/{f}")
                paths.append(str(split_dir / name / f))
                labels.append(index[name])
        if keys:
            splits[split] = Split(split, np.array(labels, dtype=np.int64), paths=paths, keys=keys)
    return Source(class_names, splits)


def _read_class_names(root: Path) -> list[str] | None:
    """Optional ROOT/classnames.txt: line i names class i."""
    path = root / "classnames.txt"
    if not path.exists():
        return None
    check_regular_file(path, "class names file")
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise LtcliError(f"{path}: cannot read class names ({exc})") from None
    while names and not names[-1]:
        names.pop()
    if not names or any(not n for n in names):
        raise LtcliError(f"{path}: expected one non-empty class name per line")
    return names


def load_list(ds: DataSpec, spec: str, allow_outside_root: bool) -> Source:
    """list:ROOT:TRAIN[,VAL[,TEST]]; list paths are relative to the cwd, image paths to ROOT."""
    root = _check_root(ds.root, spec)
    parsed = {}
    for split, list_file in zip(LIST_SPLITS, ds.lists):
        if list_file is None:
            continue
        entries = read_list_file(list_file)
        resolved = [resolve_entry(e, ds.root, list_file, allow_outside_root) for e in entries]
        parsed[split] = (list_file, entries, resolved)

    class_names = _read_class_names(root)
    train_file, train_entries, _ = parsed["train"]
    if class_names is None:
        # every class needs a train image: find the first label with none before building C names
        # (C = 1 + the largest label; one stray huge label must not allocate a name per class)
        present = sorted({e.label for e in train_entries})
        gap = next((j for j, label in enumerate(present) if label != j), None)
        if gap is not None:
            raise LtcliError(f"{train_file}: class {gap} ('class_{gap}') has no train images")
        num_classes = len(present)
        class_names = [f"class_{i}" for i in range(num_classes)]
        range_note = f"the train list's labels run 0..{num_classes - 1}"
    else:
        num_classes = len(class_names)
        range_note = f"{root / 'classnames.txt'} names {num_classes} classes"

    splits = {}
    for split, (list_file, entries, resolved) in parsed.items():
        for e in entries:
            if e.label >= num_classes:
                raise LtcliError(f"{list_file}:{e.lineno}: label {e.label} out of range ({range_note})")
        labels = np.array([e.label for e in entries], dtype=np.int64)
        if split == "train":
            counts = np.bincount(labels, minlength=num_classes)
            if (counts == 0).any():
                c = int(np.flatnonzero(counts == 0)[0])
                raise LtcliError(f"{list_file}: class {c} ('{class_names[c]}') has no train images")
        splits[split] = Split(
            split, labels, paths=[full for _, full in resolved], keys=[key for key, _ in resolved]
        )
    return Source(class_names, splits)


def _read_json(path: Path):
    if path.exists():
        check_regular_file(path, "JSON file")
    try:
        with open(path, "rb") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise LtcliError(f"{path}: not found") from None
    except OSError as exc:
        raise LtcliError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise LtcliError(f"{path}: not valid JSON ({str(exc)[:100]})") from None


def load_inat(ds: DataSpec, spec: str, allow_outside_root: bool = False) -> Source:
    """iNaturalist 2018: ROOT/train2018.json -> train, ROOT/val2018.json -> test.

    iNat's own test set has no public labels, so (as in Kang et al.) its val set is the test
    split; use --val-per-class to hold a val split out of train for tuning."""
    root = _check_root(ds.root, spec)
    train_json = root / "train2018.json"
    if not train_json.is_file():
        raise LtcliError(f"{train_json}: not found (inat expects ROOT/train2018.json, ROOT/val2018.json)")
    files = {"train": train_json}
    if (root / "val2018.json").is_file():
        files["test"] = root / "val2018.json"

    docs = {split: _read_json(path) for split, path in files.items()}
    for split, doc in docs.items():
        if not isinstance(doc, dict) or not all(isinstance(doc.get(k), list) for k in ("images", "annotations")):
            raise LtcliError(f"{files[split]}: expected a COCO-style object with 'images' and 'annotations' lists")

    cats = docs["train"].get("categories")
    try:
        if isinstance(cats, list) and cats:
            cat_ids = sorted(int(c["id"]) for c in cats)
            names = {int(c["id"]): str(c.get("name", f"class_{c['id']}")) for c in cats}
        else:
            cat_ids = sorted({int(a["category_id"]) for a in docs["train"]["annotations"]})
            names = {}
    except (KeyError, TypeError, ValueError) as exc:
        raise LtcliError(f"{train_json}: malformed categories/annotations ({exc!r})") from None
    cat_index = {cid: i for i, cid in enumerate(cat_ids)}
    class_names = [names.get(cid, f"class_{cid}") for cid in cat_ids]

    splits = {}
    for split, doc in docs.items():
        path = files[split]
        try:
            file_of = {int(im["id"]): str(im["file_name"]) for im in doc["images"]}
            keys, labels = [], []
            for a in doc["annotations"]:
                image_id, cat = int(a["image_id"]), int(a["category_id"])
                if image_id not in file_of:
                    raise LtcliError(f"{path}: annotation refers to unknown image id {image_id}")
                if cat not in cat_index:
                    raise LtcliError(f"{path}: image id {image_id} has unknown category_id {cat}")
                keys.append(os.path.normpath(file_of[image_id]).replace(os.sep, "/"))
                labels.append(cat_index[cat])
        except (KeyError, TypeError, ValueError) as exc:
            raise LtcliError(f"{path}: malformed images/annotations ({exc!r})") from None
        if not keys:
            raise LtcliError(f"{path}: holds no annotated images")
        root_real = os.path.realpath(root)
        for key in keys:
            if key == ".." or key.startswith("../") or os.path.isabs(key):
                raise LtcliError(f"{path}: file_name {key!r} lies outside the data root {ds.root}")
            if not allow_outside_root and not _inside(os.path.realpath(root / key), root_real):
                raise LtcliError(f"{path}: file_name {key!r} lies outside the data root {ds.root} through a "
                                 "symlink (use --allow-outside-root to permit it)")
        labels = np.array(labels, dtype=np.int64)
        if split == "train":
            counts = np.bincount(labels, minlength=len(class_names))
            if (counts == 0).any():
                c = int(np.flatnonzero(counts == 0)[0])
                raise LtcliError(f"{path}: category '{class_names[c]}' has no train images")
        splits[split] = Split(split, labels, paths=[str(root / k) for k in keys], keys=keys)
    return Source(class_names, splits)


def cifar_root(ds: DataSpec) -> Path:
    """ROOT from the spec, else $LTCLI_DATA_HOME, else ~/.cache/ltcli."""
    if ds.root:
        return Path(ds.root).expanduser()
    env = os.environ.get("LTCLI_DATA_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ltcli"


def load_cifar(ds: DataSpec, spec: str) -> Source:
    """torchvision CIFAR-10/100 from ROOT/cifar-10-batches-py (or cifar-100-python).

    The files are read offline when present and intact (torchvision checks their md5);
    only when they are missing is a download attempted."""
    import torchvision

    cls = torchvision.datasets.CIFAR10 if ds.kind == "cifar10" else torchvision.datasets.CIFAR100
    root = cifar_root(ds)
    splits = {}
    class_names: list[str] = []
    for split, train in (("train", True), ("test", False)):
        try:
            data = cls(str(root), train=train, download=False)
        except RuntimeError:
            # missing or corrupt: download (torchvision prints progress; keep stdout clean)
            try:
                root.mkdir(parents=True, exist_ok=True)
                with contextlib.redirect_stdout(sys.stderr):
                    data = cls(str(root), train=train, download=True)
            except Exception as exc:  # network errors come in many types
                reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
                raise LtcliError(
                    f"{root / cls.base_folder}: {ds.kind} files missing or corrupt and the "
                    f"download failed ({reason}); put the python-version archive's files "
                    f"there or set LTCLI_DATA_HOME"
                ) from None
        images = np.ascontiguousarray(data.data)
        splits[split] = Split(split, np.array(data.targets, dtype=np.int64), images=images)
        class_names = list(data.classes)
    return Source(class_names, splits, native_size=32)

"""The bad inputs that docs/errors.md refers to by placeholder ({bad_h5}, {pickle_head}, ...).

`build(base, run)` makes every one of them under `base` from a finished tiny run `run` (which
it only reads) and returns {placeholder name: path}."""

from __future__ import annotations

import json
import os
import shutil
import zlib
from pathlib import Path

import h5py
import numpy as np
import torch
from PIL import Image


class Evil:
    """Unpickling this runs a shell command (it touches `marker`): a crafted checkpoint/head."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _png(path: Path, value: int, size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)


def _jpeg_bytes(size: int = 32) -> bytes:
    import io

    buf = io.BytesIO()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels (a decompression bomb) but holds no pixel data."""
    import struct

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    path.write_bytes(data)
    return path


def _h5_copy(src: Path, dst: Path, **attrs) -> Path:
    shutil.copyfile(src, dst)
    with h5py.File(dst, "r+") as f:
        for key, value in attrs.items():
            f.attrs[key] = value
    return dst


def build(base: Path, run: Path) -> dict[str, str]:
    base.mkdir(parents=True, exist_ok=True)
    fx: dict[str, Path] = {"run": run, "base": base}
    marker = fx["marker"] = base / "PWNED"

    # --- plain files and folders
    fx["missing"] = base / "missing"
    fx["text_file"] = _write(base / "notes.txt", "just some notes\n")
    fx["empty_file"] = _write(base / "empty.txt", "")
    fx["empty_dir"] = base / "empty-dir"
    fx["empty_dir"].mkdir()

    # --- list files over a small image root (classes a=0, b=1)
    imgs = fx["imgroot"] = base / "imgs"
    for c in "ab":
        for i in range(3):
            _png(imgs / c / f"{i}.png", ord(c) * 10 + i)
    _png(base / "outside.png", 99)
    lists = base / "lists"
    good = "a/0.png 0\na/1.png 0\nb/0.png 1\nb/1.png 1\n"
    fx["list_ok"] = _write(lists / "ok.txt", good)
    fx["list_malformed"] = _write(lists / "malformed.txt", "a/0.png 0\na/1.png\nb/0.png 1\n")
    fx["list_badlabel"] = _write(lists / "badlabel.txt", "a/0.png 0\na/1.png 0\nb/0.png one\n")
    fx["list_neglabel"] = _write(lists / "neglabel.txt", "a/0.png 0\na/1.png 0\nb/0.png -1\n")
    fx["list_floatlabel"] = _write(lists / "floatlabel.txt", "a/0.png 0\nb/0.png 1.0\n")
    fx["list_latin1"] = _write(lists / "latin1.txt", "a/0.png 0\ncaf\xe9.png 1\n".encode("latin-1"))
    fx["list_blank"] = _write(lists / "blank.txt", "\n  \n\n")
    fx["list_escape"] = _write(lists / "escape.txt", "a/0.png 0\n../outside.png 1\n")
    fx["list_abs"] = _write(lists / "abs.txt", f"a/0.png 0\n{base / 'outside.png'} 1\n")
    fx["list_gap"] = _write(lists / "gap.txt", "a/0.png 0\nb/0.png 2\n")
    fx["list_hugelabel"] = _write(lists / "huge-label.txt", "a/0.png 0\nb/0.png 1000000000000\n")
    fx["list_missing_img"] = _write(lists / "missing-img.txt", "a/0.png 0\nb/nope.png 1\n")
    fx["list_nul"] = _write(lists / "nul.txt", "a/0.png 0\nb/0\x00.png 1\n")
    fx["list_test_label"] = _write(lists / "test-label.txt", "a/2.png 0\nb/2.png 7\n")
    fx["list_bom"] = _write(lists / "bom.txt", "\ufeffa/0.png 0\na/1.png\n")
    fx["list_dir"] = lists
    # a root whose classnames.txt fixes C = 2, and one with a blank name in it
    named = fx["named_root"] = base / "named"
    shutil.copytree(imgs, named)
    _write(named / "classnames.txt", "cat\ndog\n")
    fx["list_range"] = _write(lists / "range.txt", "a/0.png 0\nb/0.png 2\n")
    badnames = fx["badnames_root"] = base / "badnames"
    shutil.copytree(imgs, badnames)
    _write(badnames / "classnames.txt", "cat\n\ndog\n")

    # --- imagefolder roots with bad images
    def folder(name: str, files: dict[str, bytes | None]) -> Path:
        root = base / name
        for rel, data in files.items():
            if data is None:
                _png(root / rel, zlib.crc32(rel.encode()) % 1000)
            else:
                _write(root / rel, data)
        return root

    jpeg = _jpeg_bytes()
    fx["if_ok"] = folder("if-ok", {"train/a/0.png": None, "train/b/0.png": None})
    fx["if_corrupt"] = folder("if-corrupt", {"train/a/0.png": None, "train/a/1.jpg": b"\xff\xd8\xff\xe0 not a jpeg",
                                             "train/b/0.png": None})
    fx["if_zero"] = folder("if-zero", {"train/a/0.png": None, "train/b/0.png": b""})
    fx["if_truncated"] = folder("if-truncated", {"train/a/0.jpg": jpeg[: len(jpeg) // 2], "train/b/0.png": None})
    fx["if_textimg"] = folder("if-textimg", {"train/a/0.png": None, "train/b/0.png": b"hello, not an image\n"})
    fx["if_notrain"] = folder("if-notrain", {"test/a/0.png": None})
    fx["if_unknown"] = folder("if-unknown", {"train/a/0.png": None, "train/b/0.png": None, "test/c/0.png": None})
    fx["if_noimages"] = folder("if-noimages", {"train/a/0.png": None, "train/b/readme.txt": b"no images here"})
    fx["if_flat"] = folder("if-flat", {"train/0.png": None})
    fx["corrupt_jpg"] = _write(base / "corrupt.jpg", b"\xff\xd8\xff\xe0 not a jpeg")
    fx["bomb_png"] = _write(base / "bomb.png", _png_header(40000, 40000))
    fx["if_bomb"] = folder("if-bomb", {"train/a/0.png": None, "train/b/0.png": _png_header(40000, 40000)})
    fx["truncated_jpg"] = _write(base / "truncated.jpg", jpeg[: len(jpeg) // 2])

    # --- iNaturalist
    fx["inat_nojson"] = folder("inat-nojson", {"images/0.png": None})
    fx["inat_badjson"] = folder("inat-badjson", {"train2018.json": b"{\"images\": [", "images/0.png": None})
    fx["inat_notcoco"] = folder("inat-notcoco", {"train2018.json": b"[1, 2, 3]"})
    fx["inat_badref"] = folder("inat-badref", {"train2018.json": json.dumps({
        "images": [{"id": 1, "file_name": "images/0.png"}],
        "annotations": [{"image_id": 2, "category_id": 0}],
        "categories": [{"id": 0, "name": "x"}]}).encode()})
    fx["inat_escape"] = folder("inat-escape", {"train2018.json": json.dumps({
        "images": [{"id": 1, "file_name": "../../etc/passwd"}],
        "annotations": [{"image_id": 1, "category_id": 0}],
        "categories": [{"id": 0, "name": "x"}]}).encode()})

    # --- features files
    feats = run / "features"
    fx["bad_h5"] = _write(base / "bad.h5", "this is not HDF5\n")
    fx["zero_h5"] = _write(base / "zero.h5", b"")
    data = (feats / "train.h5").read_bytes()
    fx["truncated_h5"] = _write(base / "truncated.h5", data[: len(data) // 2])
    fx["incomplete_h5"] = _h5_copy(feats / "train.h5", base / "incomplete.h5", complete=np.bool_(False))
    fx["newer_h5"] = _h5_copy(feats / "train.h5", base / "newer.h5", format=np.int64(99))
    fx["other_backbone_val_h5"] = _h5_copy(feats / "val.h5", base / "other-backbone-val.h5", backbone_sha256="f" * 64)
    fx["other_backbone_test_h5"] = _h5_copy(feats / "test.h5", base / "other-backbone-test.h5",
                                            backbone_sha256="f" * 64)
    fx["badnames_h5"] = _h5_copy(feats / "train.h5", base / "badnames.h5", class_names="[not json")
    with h5py.File(base / "foreign.h5", "w") as f:
        f.create_dataset("x", data=np.arange(3))
    fx["foreign_h5"] = base / "foreign.h5"
    fx["nolabels_h5"] = _h5_copy(feats / "train.h5", base / "nolabels.h5")
    with h5py.File(fx["nolabels_h5"], "r+") as f:
        del f["labels"]
    fx["shard_h5"] = _h5_copy(feats / "train.h5", base / "shard.h5", shard_rank=np.int64(0),
                              shard_world=np.int64(2))
    fx["views_str_h5"] = _h5_copy(feats / "train.h5", base / "views-str.h5", views="two")
    fx["strings_h5"] = _h5_copy(feats / "train.h5", base / "strings.h5")
    with h5py.File(fx["strings_h5"], "r+") as f:
        n = f["features"].shape[0]
        del f["features"]
        f.create_dataset("features", data=np.array([b"x"] * n).reshape(n, 1))
    fx["empty_test_h5"] = _h5_copy(feats / "test.h5", base / "empty-test.h5")
    with h5py.File(fx["empty_test_h5"], "r+") as f:
        for k in ("features", "labels", "index"):
            shape, dtype = (0,) + f[k].shape[1:], f[k].dtype
            del f[k]
            f.create_dataset(k, shape=shape, dtype=dtype)
        f.attrs["rows_done"] = np.int64(0)
    fx["nan_h5"] = _h5_copy(feats / "train.h5", base / "nan.h5")
    with h5py.File(fx["nan_h5"], "r+") as f:
        f["features"][3, 0] = np.nan

    # --- checkpoints
    ckpt = torch.load(run / "backbone.pt", weights_only=True)
    fx["pickle_ckpt"] = base / "pickled-backbone.pt"
    torch.save({**ckpt, "model": Evil(marker)}, fx["pickle_ckpt"])
    fx["garbage_pt"] = _write(base / "garbage.pt", np.random.default_rng(0).bytes(4096))
    raw = (run / "backbone.pt").read_bytes()
    fx["truncated_ckpt"] = _write(base / "truncated-backbone.pt", raw[: len(raw) // 2])
    fx["zero_ckpt"] = _write(base / "zero.pt", b"")
    fx["wrong_classes_ckpt"] = base / "wrong-classes.pt"
    torch.save({**ckpt, "num_classes": ckpt["num_classes"] + 2}, fx["wrong_classes_ckpt"])
    fx["wrong_arch_ckpt"] = base / "wrong-arch.pt"
    torch.save({**ckpt, "arch": "resnet20"}, fx["wrong_arch_ckpt"])
    fx["unknown_arch_ckpt"] = base / "unknown-arch.pt"
    torch.save({**ckpt, "arch": "no-such-net"}, fx["unknown_arch_ckpt"])
    fx["tensor_pt"] = base / "tensor.pt"
    torch.save(torch.zeros(3), fx["tensor_pt"])
    fx["model_list_ckpt"] = base / "model-list.pt"
    torch.save({**ckpt, "model": [1, 2]}, fx["model_list_ckpt"])
    fx["classes_str_ckpt"] = base / "classes-str.pt"
    torch.save({**ckpt, "num_classes": "five"}, fx["classes_str_ckpt"])
    fx["nokind_ckpt"] = base / "nokind.pt"
    torch.save({k: v for k, v in ckpt.items() if k != "kind"}, fx["nokind_ckpt"])

    # --- head files
    head = torch.load(run / "heads" / "crt.pt", weights_only=True)
    fx["pickle_head"] = base / "pickled-head.pt"
    torch.save({**head, "state": Evil(marker)}, fx["pickle_head"])
    fx["head_unknown_method"] = base / "svm.pt"
    torch.save({**head, "method": "svm"}, fx["head_unknown_method"])
    fx["head_bad_format"] = base / "format9.pt"
    torch.save({**head, "format": 9}, fx["head_bad_format"])
    fx["head_bad_state"] = base / "bad-state.pt"
    torch.save({**head, "state": {**head["state"], "weight": torch.zeros(2, 2)}}, fx["head_bad_state"])
    fx["head_nan"] = base / "nan-head.pt"
    torch.save({**head, "state": {**head["state"], "weight": torch.full_like(head["state"]["weight"], float("nan"))}},
               fx["head_nan"])
    fx["head_other_backbone"] = base / "other-backbone-head.pt"
    torch.save({**head, "provenance": {**head["provenance"], "backbone_sha256": "e" * 64}},
               fx["head_other_backbone"])
    fx["head_bad_provenance"] = base / "bad-provenance-head.pt"
    torch.save({**head, "provenance": {**head["provenance"], "backbone_sha256": 5}}, fx["head_bad_provenance"])
    fx["head_list"] = base / "list-head.pt"
    torch.save([1, 2, 3], fx["head_list"])
    hraw = (run / "heads" / "crt.pt").read_bytes()
    fx["truncated_head"] = _write(base / "truncated-head.pt", hraw[: len(hraw) // 2])
    # a head fitted for other classes: 7 classes instead of 5, same D
    st = head["state"]
    c, d = st["weight"].shape
    fx["head_other_classes"] = base / "other-classes-head.pt"
    torch.save({**head, "state": {**st, "num_classes": c + 2, "class_names": st["class_names"] + ["x", "y"],
                                  "weight": torch.zeros(c + 2, d), "bias": torch.zeros(c + 2)},
                "provenance": {**head["provenance"], "num_classes": c + 2}}, fx["head_other_classes"])
    fx["heads_dir_empty"] = base / "run-noheads"
    shutil.copytree(run, fx["heads_dir_empty"], ignore=shutil.ignore_patterns("heads", "*.lock"))

    # --- run directories
    for name, text in (("run_badjson", "{\"class_names\": ["), ("run_noclasses", "{}"), ("run_list_json", "[1, 2]")):
        fx[name] = _write(base / name.replace("_", "-") / "run.json", text).parent
        shutil.copyfile(run / "backbone.pt", fx[name] / "backbone.pt")
    for name, payload in (("run_pickled_last", None), ("run_corrupt_last", b"\x80\x02 garbage")):
        dst = base / name.replace("_", "-")
        shutil.copytree(run, dst, ignore=shutil.ignore_patterns("features", "heads", "reports", "*.lock"))
        if payload is None:
            torch.save({**torch.load(dst / "backbone-last.pt", weights_only=True), "model": Evil(marker)},
                       dst / "backbone-last.pt")
        else:
            (dst / "backbone-last.pt").write_bytes(payload)
        fx[name] = dst
    fx["run_bad_optimizer"] = base / "run-bad-optimizer"
    shutil.copytree(run, fx["run_bad_optimizer"], ignore=shutil.ignore_patterns("features", "heads", "reports", "*.lock"))
    last = torch.load(fx["run_bad_optimizer"] / "backbone-last.pt", weights_only=True)
    torch.save({**last, "optimizer": None}, fx["run_bad_optimizer"] / "backbone-last.pt")
    fx["run_nocounts"] = base / "run-nocounts"
    shutil.copytree(run, fx["run_nocounts"], ignore=shutil.ignore_patterns("features", "heads", "reports", "*.lock"))
    info = json.loads((run / "run.json").read_text())
    info.pop("train_counts")
    (fx["run_nocounts"] / "run.json").write_text(json.dumps(info))
    fx["run_no_last"] = base / "run-no-last"
    shutil.copytree(run, fx["run_no_last"], ignore=shutil.ignore_patterns("backbone-last.pt", "*.lock"))
    fx["run_nobackbone"] = base / "run-nobackbone"
    shutil.copytree(run, fx["run_nobackbone"], ignore=shutil.ignore_patterns("backbone*.pt", "*.lock"))

    _reliability_fixtures(fx, base, run)
    return {k: str(v) for k, v in fx.items()}


def _reliability_fixtures(fx: dict, base: Path, run: Path) -> None:
    """Inputs of the second reliability round: special files, files that declare more than
    they hold, checkpoints with NaN weights, symlinks that leave where they belong."""
    feats = run / "features"
    for name in ("fifo.png", "fifo.h5"):
        os.mkfifo(base / name)
    fx["fifo_png"], fx["fifo_h5"] = base / "fifo.png", base / "fifo.h5"
    fx["complete_str_h5"] = _h5_copy(feats / "train.h5", base / "complete-str.h5", complete="False")
    fx["rows_done_newline_h5"] = _h5_copy(feats / "train.h5", base / "rows-done-newline.h5", rows_done=b"\n")
    fx["huge_h5"] = base / "huge.h5"
    with h5py.File(fx["huge_h5"], "w") as f:  # declares 2**30 x 4096 rows, stores nothing
        f.create_dataset("features", shape=(1 << 30, 4096), dtype=np.float16, chunks=(64, 4096))
        f.create_dataset("labels", shape=(1 << 30,), dtype=np.int64, chunks=(4096,))
        f.create_dataset("index", shape=(1 << 30,), dtype=np.int64, chunks=(4096,))
        with h5py.File(feats / "train.h5") as src:
            for k, v in src.attrs.items():
                f.attrs[k] = v
    fx["other_backbone_train_h5"] = _h5_copy(feats / "train.h5", base / "other-backbone-train.h5",
                                             backbone_sha256="e" * 64)
    ckpt = torch.load(run / "backbone.pt", weights_only=True)
    first = next(k for k, v in ckpt["model"].items() if v.is_floating_point())
    ckpt["model"][first] = torch.full_like(ckpt["model"][first], float("nan"))
    fx["nan_weights_ckpt"] = base / "nan-weights.pt"
    torch.save(ckpt, fx["nan_weights_ckpt"])
    fx["nan_weights_name"] = first
    # imagefolder whose class folder b links up to the data root (other classes, the test split)
    root = base / "if-uplink"
    for split, cls, n in (("train", "a", 3), ("test", "a", 1)):
        for i in range(n):
            _png(root / split / cls / f"{i}.png", i)
    os.symlink("..", root / "train" / "b")
    fx["if_uplink"] = root
    # a list file whose image lies in ROOT/link -> a folder outside ROOT
    outside = base / "outside-dir"
    _png(outside / "x.png", 5)
    os.symlink(outside, fx["imgroot"] / "link")
    fx["list_link_out"] = _write(base / "lists" / "link-out.txt", "a/0.png 0\nlink/x.png 1\n")
    fx["two_paths"] = _write(base / "two-paths.txt", f"{feats / 'train.h5'}\n{feats / 'train.h5'}\n")
    fx["list_two"] = _write(base / "lists" / "two-per-class.txt", "a/0.png 0\na/1.png 0\nb/0.png 1\nb/1.png 1\n")

"""Property-based fuzz of every loader of outside input: images, list files, feature-cache
attributes, head files and checkpoints. Whatever the bytes, a loader either returns something
valid or raises LtcliError (one line, naming the file): never another exception, never a
hang, never a huge allocation."""

from __future__ import annotations

import io
import struct
import zlib

import h5py
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from ltcli.cache import read_features
from ltcli.checkpoint import load_backbone
from ltcli.data.listfile import parse_list_text
from ltcli.data.types import Split
from ltcli.errors import LtcliError
from ltcli.heads import load_head

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _png_bytes(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG")
    return buf.getvalue()


VALID_IMAGES = [
    _png_bytes(np.zeros((8, 8, 3), np.uint8)),
    _png_bytes((np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)),
    _png_bytes(np.full((8, 8, 4), 200, np.uint8)),
]


@FUZZ
@given(base=st.sampled_from(VALID_IMAGES), cuts=st.lists(st.tuples(st.integers(0, 400), st.binary(max_size=8)),
                                                          max_size=4))
def test_images_decode_or_fail_cleanly(tmp_path, base, cuts):
    data = bytearray(base)
    for pos, chunk in cuts:  # overwrite bytes here and there (headers included)
        p = min(pos, len(data))
        data[p : p + len(chunk)] = chunk
    path = tmp_path / "x.png"
    path.write_bytes(bytes(data))
    split = Split("t", np.zeros(1, np.int64), paths=[str(path)])
    try:
        img = split.load(0)
    except LtcliError as exc:
        assert str(exc).startswith(str(path)) and "\n" not in str(exc)
        return
    assert img.mode == "RGB" and min(img.size) >= 1


def test_a_huge_declared_png_is_refused_before_decoding(tmp_path):
    """IHDR says 60000 x 60000 (3.6 GP): refused from the header, nothing allocated."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    path = tmp_path / "bomb.png"
    path.write_bytes(png)
    with pytest.raises(LtcliError, match="cannot read image"):
        Split("t", np.zeros(1, np.int64), paths=[str(path)]).load(0)


@FUZZ
@given(text=st.text(max_size=300))
def test_list_files_parse_or_fail_cleanly(text):
    try:
        entries = parse_list_text(text, "l.txt")
    except LtcliError as exc:
        assert str(exc).startswith("l.txt:") and "\n" not in str(exc)
        return
    for e in entries:
        assert e.label >= 0 and e.lineno >= 1 and "\x00" not in e.path


ATTR_VALUES = st.one_of(
    st.integers(-2**63, 2**63 - 1), st.floats(allow_nan=True), st.text(max_size=20), st.booleans(),
    st.lists(st.integers(-5, 10**12), max_size=6), st.binary(max_size=10),
)


@pytest.fixture(scope="module")
def good_h5(tmp_path_factory):
    path = tmp_path_factory.mktemp("h5") / "good.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=np.zeros((6, 4), np.float16))
        f.create_dataset("labels", data=np.arange(6) % 2)
        f.create_dataset("index", data=np.arange(6))
        g = f.create_group("classifier")
        g.create_dataset("weight", data=np.zeros((2, 4), np.float32))
        f.attrs.update({"format": 1, "split": "train", "class_names": '["a", "b"]', "train_class_counts": [3, 3],
                        "backbone_sha256": "ab" * 32, "data_fingerprint": "cd" * 32, "transform": "t", "views": 1,
                        "rows_done": 6, "complete": np.bool_(True)})
    return path


@FUZZ
@given(key=st.sampled_from(["format", "split", "class_names", "train_class_counts", "views", "rows_done",
                            "complete", "backbone_sha256"]), value=ATTR_VALUES)
@example(key="rows_done", value=b"\n")  # once quoted as it was: a two-line error
def test_feature_cache_attributes_read_or_fail_cleanly(tmp_path, good_h5, key, value):
    path = tmp_path / "f.h5"
    path.write_bytes(good_h5.read_bytes())
    with h5py.File(path, "r+") as f:
        try:
            f.attrs[key] = value
        except (TypeError, ValueError):
            return
    try:
        fs = read_features(path)
    except LtcliError as exc:
        assert str(exc).startswith(str(path)) and "\n" not in str(exc)
        return
    assert fs.features.shape == (6, 4) and fs.num_classes == len(fs.train_counts)


PLAIN = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-10, 10**6), st.floats(allow_nan=True), st.text(max_size=8),
              st.builds(lambda n: torch.randn(n), st.integers(0, 4))),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)


@FUZZ
@given(state=st.dictionaries(st.sampled_from(["options", "dim", "num_classes", "class_names", "weight", "bias",
                                              "mean", "class_means", "bank", "bank_labels", "scales", "log_prior"]),
                             PLAIN, max_size=8),
       method=st.sampled_from(["joint", "crt", "lws", "tau-norm", "logit-adjust", "ncm", "knn", "svm", 7]),
       provenance=st.dictionaries(st.text(max_size=12), PLAIN, max_size=4))
def test_head_files_load_or_fail_cleanly(tmp_path, state, method, provenance):
    path = tmp_path / "h.pt"
    torch.save({"format": 1, "method": method, "options": {}, "state": state, "provenance": provenance}, path)
    try:
        head, _ = load_head(path)
    except LtcliError as exc:
        assert str(exc).startswith(str(path)) and "\n" not in str(exc)
        return
    assert head.num_classes >= 1 and head.dim >= 1


@FUZZ
@given(ckpt=st.dictionaries(st.sampled_from(["kind", "arch", "num_classes", "feature_dim", "model", "epoch"]),
                            PLAIN, max_size=6),
       kind=st.sampled_from(["ltcli-backbone", "other"]))
def test_checkpoints_load_or_fail_cleanly(tmp_path, ckpt, kind):
    path = tmp_path / "c.pt"
    torch.save({**ckpt, "kind": kind}, path)
    try:
        loaded = load_backbone(path)
    except LtcliError as exc:
        assert str(exc).startswith(str(path)) and "\n" not in str(exc)
        return
    assert isinstance(loaded["model"], dict) and loaded["num_classes"] >= 1

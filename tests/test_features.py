"""The HDF5 feature cache: schema, streaming writer, resume, reuse, provenance, refusals."""

from __future__ import annotations

import errno
import hashlib
import io
import json

import h5py
import numpy as np
import pytest
import torch
from rich.console import Console

from ltcli.errors import JobFailed, LtcliError
from ltcli.cache import (
    FORMAT_VERSION,
    FeatureSet,
    FeatureWriter,
    check_compatible,
    info,
    info_table,
    read_attrs,
    read_features,
)
from ltcli.io import exclusive_lock

N, D, C = 300, 8, 4
NAMES = ["cat", "dog", "eel", "fox"]
COUNTS = [150, 100, 40, 10]


def _attrs(**over):
    a = dict(
        split="train",
        class_names=NAMES,
        train_class_counts=COUNTS,
        backbone_sha256="a" * 64,
        data_fingerprint="b" * 64,
        dataset_id="c" * 64,
        transform="decode to 32px uint8; normalize_batch",
        arch="resnet8",
        seed=0,
    )
    a.update(over)
    return a


def _data(views=1, seed=0):
    rng = np.random.default_rng(seed)
    shape = (N, D) if views == 1 else (N, views, D)
    return rng.standard_normal(shape).astype(np.float32)


def _write(path, data=None, *, views=1, dtype="float16", stop=None, batch_size=64, attrs=None, **kw):
    data = _data(views) if data is None else data
    labels = np.arange(N) % C
    with FeatureWriter(
        path, rows=N, dim=D, views=views, dtype=dtype, labels=labels, index=np.arange(N) * 2,
        attrs=attrs or _attrs(), weight=torch.ones(C, D), bias=torch.arange(C).float(),
        batch_size=batch_size, quiet=True, **kw,
    ) as w:
        if w.reused:
            return w
        for s in range(w.rows_done, N, w.batch_size):
            if stop is not None and s >= stop:
                return w
            w.write(s, data[s : s + w.batch_size])
        w.finish()
    return w


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_schema_read_back_with_h5py(tmp_path):
    p = tmp_path / "train.h5"
    data = _data()
    _write(p, data)
    with h5py.File(p, "r") as f:
        assert f["features"].shape == (N, D) and f["features"].dtype == np.float16
        assert f["features"].chunks is None  # one contiguous block: readers memory-map it
        np.testing.assert_array_equal(f["features"][()], data.astype(np.float16))
        assert f["labels"].dtype == np.int64 and list(f["labels"][:5]) == [0, 1, 2, 3, 0]
        assert f["index"].dtype == np.int64 and list(f["index"][:3]) == [0, 2, 4]
        assert f["classifier/weight"].shape == (C, D) and f["classifier/weight"].dtype == np.float32
        assert f["classifier/bias"].shape == (C,) and f["classifier/bias"].dtype == np.float32
        a = f.attrs
        assert a["format"] == FORMAT_VERSION == 1
        assert a["split"] == "train"
        assert json.loads(a["class_names"]) == NAMES
        assert list(a["train_class_counts"]) == COUNTS and a["train_class_counts"].dtype == np.int64
        assert a["backbone_sha256"] == "a" * 64 and a["data_fingerprint"] == "b" * 64
        assert a["dataset_id"] == "c" * 64 and a["transform"].startswith("decode")
        assert a["views"] == 1 and bool(a["complete"]) is True and a["rows_done"] == N
    fs = read_features(p)
    assert isinstance(fs, FeatureSet)
    assert fs.features.dtype == torch.float32 and fs.features.shape == (N, D)
    assert torch.equal(fs.features, torch.from_numpy(data).half().float())
    assert fs.labels.dtype == torch.int64 and fs.split == "train" and fs.class_names == NAMES
    assert fs.train_counts.tolist() == COUNTS and fs.weight.shape == (C, D) and fs.bias.tolist() == [0, 1, 2, 3]
    assert fs.attrs["backbone_sha256"] == "a" * 64 and fs.attrs["path"] == str(p)
    assert fs.attrs["index"][:3].tolist() == [0, 2, 4]


def test_float32_and_views(tmp_path):
    data = _data()
    _write(tmp_path / "f32.h5", data, dtype="float32")
    fs = read_features(tmp_path / "f32.h5")
    assert torch.equal(fs.features, torch.from_numpy(data))
    with h5py.File(tmp_path / "f32.h5") as f:
        assert f["features"].dtype == np.float32

    data3 = _data(views=3)
    _write(tmp_path / "v.h5", data3, views=3)
    fs = read_features(tmp_path / "v.h5")
    assert fs.features.shape == (N, 3, D) and fs.views == 3
    assert torch.equal(fs.features, torch.from_numpy(data3).half().float())
    with h5py.File(tmp_path / "v.h5") as f:
        assert f.attrs["views"] == 3


def test_mmap_read(tmp_path):
    data = _data()
    _write(tmp_path / "a.h5", data)
    fs = read_features(tmp_path / "a.h5", mmap=True)
    assert fs.features.dtype == torch.float16
    assert torch.equal(fs.features.float(), torch.from_numpy(data).half().float())


def test_uninterrupted_runs_and_resume_are_byte_identical(tmp_path):
    a, b, c = tmp_path / "a.h5", tmp_path / "b.h5", tmp_path / "c.h5"
    _write(a)
    _write(b)
    assert _sha(a) == _sha(b)
    w = _write(c, stop=128)
    assert not w._finished
    assert info(c)["complete"] is False and info(c)["rows_done"] == 128
    with pytest.raises(LtcliError, match="incomplete feature cache"):
        read_features(c)
    w = _write(c)
    assert w.resumed and _sha(c) == _sha(a)


def test_resume_keeps_the_batch_size_it_started_with(tmp_path):
    a, c = tmp_path / "a.h5", tmp_path / "c.h5"
    _write(a, batch_size=64)
    _write(c, batch_size=64, stop=64)
    w = _write(c, batch_size=100)
    assert w.batch_size == 64 and _sha(c) == _sha(a)


def test_complete_file_is_reused_unless_overwrite(tmp_path, capsys):
    p = tmp_path / "a.h5"
    _write(p)
    before = p.stat().st_mtime_ns, _sha(p)
    w = _write(p)
    assert w.reused and (p.stat().st_mtime_ns, _sha(p)) == before
    w = _write(p, data=_data(seed=1), overwrite=True)
    assert not w.reused and _sha(p) != before[1]


@pytest.mark.parametrize(
    "field,over",
    [
        ("backbone_sha256", {"backbone_sha256": "f" * 64}),
        ("data_fingerprint", {"data_fingerprint": "e" * 64}),
        ("transform", {"transform": "other"}),
        ("class_names", {"class_names": ["a", "b", "c", "d"]}),
    ],
)
def test_provenance_mismatch_is_refused(tmp_path, field, over):
    p = tmp_path / "a.h5"
    _write(p, stop=64)   # incomplete
    with pytest.raises(LtcliError) as e:
        _write(p, attrs=_attrs(**over))
    msg = str(e.value)
    assert str(p) in msg and field in msg and "--overwrite" in msg and "\n" not in msg
    _write(p)            # still resumable with the right provenance
    with pytest.raises(LtcliError, match=field):
        _write(p, attrs=_attrs(**over))   # complete file, different job
    _write(p, attrs=_attrs(**over), overwrite=True)
    assert read_attrs(p)[field] == over[field]


def test_shape_and_dtype_mismatch_is_refused(tmp_path):
    p = tmp_path / "a.h5"
    _write(p)
    with pytest.raises(LtcliError, match="dtype"):
        _write(p, dtype="float32")
    with pytest.raises(LtcliError, match="views"):
        _write(p, views=2)


def test_lock_refuses_a_second_writer(tmp_path):
    p = tmp_path / "a.h5"
    with exclusive_lock(p):
        with pytest.raises(LtcliError, match="another ltcli process"):
            _write(p)
    assert not p.exists()
    _write(p)


def test_disk_full_leaves_an_incomplete_resumable_file(tmp_path, monkeypatch):
    ref = tmp_path / "ref.h5"
    _write(ref)
    p = tmp_path / "a.h5"
    real = h5py.Dataset.__setitem__
    calls = {"n": 0}

    def full(self, key, value):
        if self.name == "/features":
            calls["n"] += 1
            if calls["n"] > 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, key, value)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", full)
    with pytest.raises(JobFailed) as e:  # the job failed, not the input: exit 1
        _write(p)
    msg = str(e.value)
    assert "no space left on device" in msg and str(p) in msg and "resume" in msg
    monkeypatch.setattr(h5py.Dataset, "__setitem__", real)
    d = info(p)
    assert d["complete"] is False and d["rows_done"] == 128
    with pytest.raises(LtcliError, match="incomplete"):
        read_features(p)
    _write(p)
    assert _sha(p) == _sha(ref)


def test_not_enough_space_is_refused_up_front(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10, 10, 10))
    with pytest.raises(JobFailed, match="not enough disk space"):
        _write(tmp_path / "a.h5")
    assert not (tmp_path / "a.h5").exists()


def test_non_finite_features_are_refused(tmp_path):
    data = _data()
    data[70, 3] = 1e6   # beyond float16
    with pytest.raises(LtcliError, match="row 70 has non-finite features.*float32"):
        _write(tmp_path / "a.h5", data)
    assert info(tmp_path / "a.h5")["rows_done"] == 64


def test_unwritable_output(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(LtcliError, match="file"):
        _write(blocker / "sub" / "a.h5")


# --- refusing bad files ---------------------------------------------------------------------


def test_missing_directory_garbage_and_empty_files(tmp_path):
    with pytest.raises(LtcliError, match="not found"):
        read_features(tmp_path / "nope.h5")
    with pytest.raises(LtcliError, match="directory"):
        read_features(tmp_path)
    g = tmp_path / "garbage.h5"
    g.write_bytes(b"this is not hdf5 at all" * 100)
    e = tmp_path / "empty.h5"
    e.write_bytes(b"")
    for p in (g, e):
        for fn in (read_features, info, read_attrs):
            with pytest.raises(LtcliError, match="not a valid ltcli features file") as exc:
                fn(p)
            assert str(p) in str(exc.value) and "\n" not in str(exc.value)


def test_truncated_file_is_refused(tmp_path):
    p = tmp_path / "a.h5"
    _write(p)
    data = p.read_bytes()
    for cut in (len(data) // 2, 1000, 100):
        t = tmp_path / f"cut{cut}.h5"
        t.write_bytes(data[:cut])
        for fn in (read_features, info):
            with pytest.raises(LtcliError) as exc:
                fn(t)
            assert str(t) in str(exc.value) and "\n" not in str(exc.value)


def test_overwritten_bytes_inside_are_refused_or_read(tmp_path):
    """Garbage in the middle of a file: either an LtcliError or a clean read, never a crash."""
    p = tmp_path / "a.h5"
    _write(p)
    raw = bytearray(p.read_bytes())
    for off in range(0, len(raw), max(1, len(raw) // 12)):
        bad = bytearray(raw)
        bad[off : off + 64] = b"\xa5" * 64
        q = tmp_path / f"bad{off}.h5"
        q.write_bytes(bytes(bad))
        for fn in (read_features, info):
            try:
                fn(q)
            except LtcliError as exc:
                assert "\n" not in str(exc)


def test_other_hdf5_and_newer_format_are_refused(tmp_path):
    p = tmp_path / "other.h5"
    with h5py.File(p, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(LtcliError, match="not an ltcli features file.*format"):
        read_features(p)
    q = tmp_path / "new.h5"
    _write(q)
    with h5py.File(q, "r+") as f:
        f.attrs["format"] = 99
    with pytest.raises(LtcliError, match="format 99 is newer"):
        read_features(q)
    r = tmp_path / "nofeat.h5"
    _write(r)
    with h5py.File(r, "r+") as f:
        del f["labels"]
    with pytest.raises(LtcliError, match="missing dataset /labels"):
        read_features(r)


def test_existing_non_feature_file_is_not_clobbered(tmp_path):
    p = tmp_path / "a.h5"
    p.write_bytes(b"precious")
    for overwrite in (False, True):  # not even with --overwrite: it is not a features file
        with pytest.raises(LtcliError, match="exists and is not a features file"):
            _write(p, overwrite=overwrite)
        assert p.read_bytes() == b"precious"
    p.unlink()
    _write(p)
    read_features(p)


# --- compatibility and info -----------------------------------------------------------------


def test_check_compatible(tmp_path):
    a, b, c, d = (tmp_path / f"{x}.h5" for x in "abcd")
    _write(a)
    _write(b, attrs=_attrs(split="test", data_fingerprint="9" * 64))
    _write(c, attrs=_attrs(backbone_sha256="1234567890abcdef" * 4))
    _write(d, attrs=_attrs(dataset_id="d" * 64))
    check_compatible(a, b)
    check_compatible(read_features(a), read_features(b))
    with pytest.raises(LtcliError) as e:
        check_compatible(a, c)
    msg = str(e.value)
    assert f"{a} and {c} come from different backbones" in msg
    assert "aaaaaaaaaaaa…" in msg and "1234567890ab…" in msg
    with pytest.raises(LtcliError, match="different datasets \\(dataset_id"):
        check_compatible(read_features(a), d)


def test_info_on_complete_and_incomplete_files(tmp_path):
    p = tmp_path / "a.h5"
    _write(p, stop=64)
    d = info(p)
    assert d["complete"] is False and d["rows_done"] == 64 and d["rows"] == N
    _write(p)
    d = info(p)
    json.dumps(d)
    assert d["complete"] is True and d["shape"] == [N, D] and d["dtype"] == "float16"
    assert d["split"] == "train" and d["views"] == 1 and d["num_classes"] == C
    assert [c["group"] for c in d["classes"]] == ["many", "medium", "medium", "few"]
    assert d["groups"]["many"] == {"classes": 1, "rows": N // C, "train_images": 150}
    assert d["provenance"]["backbone_sha256"] == "a" * 64
    out = io.StringIO()
    Console(file=out, width=120).print(info_table(d))
    text = out.getvalue()
    assert "complete" in text and "300 x 8 float16" in text and "fox" in text

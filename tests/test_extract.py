"""`ltcli.extraction`: backbone -> feature cache, on tiny stand-in models and data (CPU)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from ltcli.data.types import Split
from ltcli.errors import LtcliError
from ltcli.extraction import Extraction, extract_split, rank_rows
from ltcli.inputs import batch_ranges
from ltcli.cache import read_features, shard_path
from ltcli.io import exclusive_lock
from ltcli.models import LTNet
from ltcli.transforms import augment_batch, normalize_batch
from ltcli import transforms as T

REPO = Path(__file__).resolve().parents[1]
C = 3


def tiny_model(seed=0, dim=6, classes=C) -> LTNet:
    g = torch.Generator().manual_seed(seed)
    enc = torch.nn.Sequential(
        torch.nn.Conv2d(3, dim, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
    )
    net = LTNet(enc, dim, classes, "tiny")
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return net.eval()


def mem_split(n=100, side=8, seed=0, name="train") -> Split:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8)
    return Split(name, np.arange(n) % C, images=images)


def opts(**over):
    o = dict(
        backbone_sha256="ab" * 32, class_names=["a", "b", "c"], train_counts=[50, 30, 20],
        dataset_id="cd" * 32, batch_size=16, progress=False,
    )
    o.update(over)
    return o


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_small_images_features_match_the_model(tmp_path):
    model, split = tiny_model(), mem_split()
    out = extract_split(model, split, tmp_path / "train.h5", **opts())
    assert out == tmp_path / "train.h5"
    fs = read_features(out)
    x = normalize_batch(torch.from_numpy(split.images).permute(0, 3, 1, 2))
    with torch.no_grad():
        want = model.features(x)
    assert fs.features.shape == (100, 6)
    torch.testing.assert_close(fs.features, want.half().float(), rtol=0, atol=0)
    assert fs.labels.tolist() == split.labels.tolist() and fs.attrs["index"].tolist() == list(range(100))
    assert torch.equal(fs.weight, model.fc.weight) and torch.equal(fs.bias, model.fc.bias)
    assert fs.attrs["data_fingerprint"] == split.fingerprint() and fs.attrs["arch"] == "tiny"
    assert "8px" in fs.attrs["transform"]
    with h5py.File(out) as f:
        assert f["features"].dtype == np.float16 and f.attrs["batch_size"] == 16

    out32 = extract_split(model, split, tmp_path / "f32.h5", **opts(dtype="float32"))
    fs32 = read_features(out32)
    torch.testing.assert_close(fs32.features, want, rtol=1e-5, atol=1e-6)


def test_deterministic_and_reused(tmp_path, capsys, monkeypatch):
    model, split = tiny_model(), mem_split()
    a = extract_split(model, split, tmp_path / "a.h5", **opts())
    b = extract_split(model, split, tmp_path / "b.h5", **opts())
    assert sha(a) == sha(b)
    mtime = a.stat().st_mtime_ns
    import ltcli.data

    def no_decode(*a, **k):
        raise AssertionError("a reused file must not decode the split")

    with monkeypatch.context() as m:
        m.setattr(ltcli.data, "decode_split", no_decode)
        extract_split(model, split, a, **opts(progress=True))
    assert a.stat().st_mtime_ns == mtime and "reusing" in capsys.readouterr().err
    with pytest.raises(LtcliError, match="backbone_sha256.*--overwrite"):
        extract_split(model, split, a, **opts(backbone_sha256="ef" * 32))
    extract_split(tiny_model(seed=1), split, a, **opts(backbone_sha256="ef" * 32, overwrite=True))
    assert sha(a) != sha(b)


def test_views_are_seeded_augmentations(tmp_path):
    model, split = tiny_model(), mem_split(n=40)
    a = read_features(extract_split(model, split, tmp_path / "a.h5", **opts(views=3, seed=5)))
    b = read_features(extract_split(model, split, tmp_path / "b.h5", **opts(views=3, seed=5)))
    c = read_features(extract_split(model, split, tmp_path / "c.h5", **opts(views=3, seed=6)))
    assert a.features.shape == (40, 3, 6) and a.views == 3
    assert torch.equal(a.features, b.features) and not torch.equal(a.features, c.features)
    assert not torch.equal(a.features[:, 0], a.features[:, 1])
    # view 0 of the first batch is augment_batch with the documented generator
    from ltcli.inputs import mix_seed as _mix

    x = torch.from_numpy(split.images[:16]).permute(0, 3, 1, 2).contiguous()
    g = torch.Generator().manual_seed(_mix(5, 0, 0))
    with torch.no_grad():
        want = model.features(normalize_batch(augment_batch(x, g)))
    assert torch.equal(a.features[:16, 0], want.half().float())
    assert "3 views, seed 5" in a.attrs["transform"]


def _png_split(tmp_path, n=20, bad=()):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = tmp_path / "img" / f"{i:03d}.png"
        p.parent.mkdir(exist_ok=True)
        if i in bad:
            p.write_bytes(b"not an image")
        else:
            h, w = 20 + (i % 3) * 4, 24
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    keys = [f"img/{i:03d}.png" for i in range(n)]
    return Split("test", np.arange(n) % C, paths=paths, keys=keys)


def test_large_image_path_with_a_loader(tmp_path):
    model, split = tiny_model(), _png_split(tmp_path)
    out = extract_split(model, split, tmp_path / "test.h5",
                        **opts(in_memory=False, size=16, workers=0, gpu_decode=True))
    fs = read_features(out)
    tf = T.test_transform(16)
    x = torch.stack([tf(split.load(i)) for i in range(len(split))])
    with torch.no_grad():
        want = model.features(x)
    torch.testing.assert_close(fs.features, want.half().float(), rtol=0, atol=0)
    assert fs.split == "test" and "CenterCrop" in fs.attrs["transform"]
    # two workers give the same file
    out2 = extract_split(model, split, tmp_path / "test2.h5", **opts(in_memory=False, size=16, workers=2))
    assert sha(out) == sha(out2)


def test_bad_images_refused_or_skipped(tmp_path):
    model, split = tiny_model(), _png_split(tmp_path, bad=(3, 11))
    for small in (False, True):
        with pytest.raises(LtcliError, match="003.png"):
            extract_split(model, split, tmp_path / f"x{small}.h5", **opts(in_memory=small, size=16))
        fs = read_features(extract_split(model, split, tmp_path / f"y{small}.h5",
                                         **opts(in_memory=small, size=16, skip_bad=True)))
        keep = [i for i in range(20) if i not in (3, 11)]
        assert fs.attrs["index"].tolist() == keep
        assert fs.labels.tolist() == [i % C for i in keep]


def test_second_writer_is_refused(tmp_path):
    out = tmp_path / "a.h5"
    with exclusive_lock(out):
        with pytest.raises(LtcliError, match="another ltcli process"):
            extract_split(tiny_model(), mem_split(), out, **opts())


def test_batch_grid_and_rank_rows():
    assert list(batch_ranges(0, 40, 16)) == [(0, 16), (16, 32), (32, 40)]
    assert list(batch_ranges(20, 40, 16)) == [(20, 32), (32, 40)]
    parts = [rank_rows(100, 16, r, 3) for r in range(3)]
    assert parts[0][0] == 0 and parts[-1][1] == 100
    assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
    assert all(s % 16 == 0 for s, _ in parts)
    assert [rank_rows(10, 16, r, 2) for r in range(2)] == [(0, 0), (0, 10)]   # an empty share


@pytest.mark.parametrize("world", [2, 3])
def test_shards_merge_into_the_single_process_file(tmp_path, world):
    model, split = tiny_model(), mem_split(n=90)
    single = extract_split(model, split, tmp_path / "single.h5", **opts(views=2))
    out = tmp_path / "merged.h5"
    job = Extraction(model, split, out, **opts(views=2))
    shards = [job.run_shard(r, world) for r in range(world)]
    assert all(p.exists() for p in shards) and shards[1] == shard_path(out, 1, world)
    with pytest.raises(LtcliError, match="shard"):
        read_features(shards[0])
    job.merge(world)
    assert not any(p.exists() for p in shards)
    assert sha(out) == sha(single)


JOB = textwrap.dedent(
    """
    import sys, numpy as np, torch
    torch.set_num_threads(1)
    from ltcli.data.types import Split
    from ltcli.errors import LtcliError
    from ltcli.extraction import extract_split

    class Tiny(torch.nn.Module):   # no torchvision import: this script starts three times
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
            self.fc = torch.nn.Linear(6, 3)
            self.feature_dim, self.arch = 6, "tiny"
            with torch.no_grad():
                for p in self.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        def features(self, x):
            return torch.relu(self.conv(x)).mean(dim=(2, 3))

    import os
    if os.environ.get("DIST_FILE"):
        import torch.distributed as dist
        dist.init_process_group("gloo", init_method="file://" + os.environ["DIST_FILE"],
                                rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    rng = np.random.default_rng(0)
    split = Split("train", np.arange(600) % 3, images=rng.integers(0, 256, (600, 16, 16, 3), dtype=np.uint8))
    try:
        extract_split(Tiny().eval(), split, sys.argv[1], backbone_sha256="ab" * 32, class_names=["a", "b", "c"],
                      train_counts=[50, 30, 20], dataset_id="cd" * 32, batch_size=32, progress=False)
    except LtcliError as e:
        print("ltcli: error:", e, file=sys.stderr); sys.exit(2)
    print(sys.argv[1])
    if os.environ.get("DIST_FILE"):
        dist.destroy_process_group()   # gloo aborts at exit ("terminate called...") otherwise
    """
)


@pytest.fixture(scope="module")
def job_script(tmp_path_factory):
    """The job script and the file of one uninterrupted single-process run of it."""
    d = tmp_path_factory.mktemp("job")
    script = d / "job.py"
    script.write_text(JOB)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, str(script), str(d / "ref.h5")], env=env, check=True,
                   stdout=subprocess.DEVNULL, timeout=180)
    return script, d / "ref.h5", env


def test_sigkill_then_resume_is_byte_identical(tmp_path, job_script):
    script, ref, env = job_script
    out = tmp_path / "out.h5"

    slow = {**env, "LTCLI_TEST_SLOW_CHUNK": "0.1"}
    proc = subprocess.Popen([sys.executable, str(script), str(out)], env=slow, stderr=subprocess.PIPE, text=True)
    seen = 0
    for line in proc.stderr:
        if line.startswith("ltcli-test: rows_done="):
            seen = int(line.split("=")[1])
            if seen >= 160:
                proc.send_signal(signal.SIGKILL)
                break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL and 160 <= seen < 600
    with h5py.File(out, "r") as f:
        assert not bool(f.attrs["complete"]) and f.attrs["rows_done"] >= 160
    with pytest.raises(LtcliError, match="incomplete"):
        read_features(out)

    # rerunning the same command resumes from rows_done and ends with the same bytes
    with h5py.File(out, "r") as f:
        done = int(f.attrs["rows_done"])
    markers = {**env, "LTCLI_TEST_SLOW_CHUNK": "0.001"}
    r = subprocess.run([sys.executable, str(script), str(out)], env=markers, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out)
    first = [int(x.split("=")[1]) for x in r.stderr.splitlines() if x.startswith("ltcli-test: rows_done=")][0]
    assert first == min(600, (done // 32 + 1) * 32)   # started at rows_done, not at 0
    assert sha(out) == sha(ref)


@pytest.mark.slow
def test_two_process_gloo_extraction_equals_single_process(tmp_path, job_script):
    script, ref, env = job_script
    out = tmp_path / "out.h5"
    procs = []
    for rank in range(2):
        denv = {**env, "DIST_FILE": str(tmp_path / "store"), "RANK": str(rank), "WORLD_SIZE": "2"}
        procs.append(subprocess.Popen([sys.executable, str(script), str(out)], env=denv,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert all(r[0].strip() == str(out) for r in results)
    assert sha(out) == sha(ref)
    assert not list(tmp_path.glob("out.h5.rank*"))


def test_big_jpegs_are_extracted_from_a_reduced_scale_decode(tmp_path):
    """The test transform's input comes from Split.load(draft=resize side), and the cache's
    transform attribute says so (a file made without it is never resumed with it)."""
    rng = np.random.default_rng(1)
    paths = []
    for i in range(6):
        p = tmp_path / f"{i}.jpg"
        small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((160, 120), Image.BILINEAR).save(p, quality=95)
        paths.append(str(p))
    split = Split("test", np.arange(6) % C, paths=paths, keys=[f"{i}.jpg" for i in range(6)])
    model = tiny_model()
    fs = read_features(extract_split(model, split, tmp_path / "t.h5", **opts(in_memory=False, size=16)))
    resize = T.test_resize(16)
    assert split.load(0, draft=resize).size == (40, 30)  # decoded at 1/4 scale
    tf = T.test_transform(16)
    x = torch.stack([tf(split.load(i, draft=resize)) for i in range(6)])
    with torch.no_grad():
        want = model.features(x)
    torch.testing.assert_close(fs.features, want.half().float(), rtol=0, atol=0)
    assert f"JPEG draft >= {resize}px" in fs.attrs["transform"]

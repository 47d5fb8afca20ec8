"""The second reliability round: inputs a hostile (or unlucky) user gives, each of a kind that
used to give a silent wrong result, a stale result with exit 0, lost data, a hang or the wrong
exit code. Single bad inputs with a one-line error are rows of docs/errors.md; these need
more than one command, a second process or a look at what was (not) written."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import LTCLI, TINY_TRAIN, check_ok, cli_env, copy_run, ltcli_in_process, run_cli
from faults.faultlib import Job
from ltcli.data.types import Split, to_rgb

CPU = ["--device", "cpu", "--workers", "0"]


def sha(p: Path) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


# --- images are decoded by mode, not clipped -----------------------------------------------------

def _load(path) -> np.ndarray:
    return np.asarray(Split("t", np.zeros(1, np.int64), paths=[str(path)]).load(0))


def test_sixteen_bit_pngs_are_scaled_not_clipped(tmp_path):
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "a.png")
    Image.fromarray(ramp[::-1].copy()).save(tmp_path / "b.png")
    a, b = _load(tmp_path / "a.png"), _load(tmp_path / "b.png")
    assert a.shape == (64, 64, 3) and a.min() == 0 and a.max() == 255   # not solid white
    assert (a != b).mean() > 0.9
    assert abs(int(a[32, 0, 0]) - round(int(ramp[32, 0]) / 257)) <= 1


def test_alpha_palette_and_cmyk_become_correct_rgb(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200  # red, fully transparent: white once composited
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    assert (_load(tmp_path / "t.png") == 255).all()
    rgba[..., 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "o.png")
    assert (_load(tmp_path / "o.png")[..., 0] == 200).all()
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    red = _load(tmp_path / "c.jpg").astype(int)
    assert red[..., 0].mean() > 200 and red[..., 1].mean() < 60
    with pytest.raises(Exception, match="unsupported mode F"):
        to_rgb(Image.new("F", (4, 4)), "x.tif")


# --- one writer per run ------------------------------------------------------------------------------

@pytest.mark.slow
def test_two_trainings_into_one_new_run_never_mix(tmp_path):
    run = tmp_path / "run"
    first = Job("train-backbone", "--run", run, *TINY_TRAIN, "--seed", "0", LTCLI_TEST_STEP_DELAY="0.3")
    first.wait_for(r"ltcli-test: epoch=0 step=0\b")
    second = run_cli(["train-backbone", "--run", run, *map(str, TINY_TRAIN), "--seed", "1"])
    assert second.code == 2 and "is writing this run" in second.err.strip().splitlines()[-1], second.err
    assert first.finish() == 0, first.stderr
    ckpt = torch.load(run / "backbone.pt", weights_only=True)
    import json

    assert json.loads((run / "run.json").read_text())["seed"] == ckpt["config"]["seed"] == 0


# --- completeness is derived from the data ----------------------------------------------------------

def test_a_forged_rows_done_is_not_believed(tiny_run, tmp_path):
    run = copy_run(tiny_run["run"], tmp_path / "run")
    out = run / "features" / "train.h5"
    job = Job("extract", "--run", run, "--split", "train", *CPU, "--batch-size", "128", LTCLI_TEST_SLOW_CHUNK="2")
    job.wait_for(r"ltcli-test: rows_done=128$")
    job.kill()
    with h5py.File(out, "r+") as f:  # claim every row is written
        f.attrs["rows_done"] = np.int64(f["features"].shape[0])
    r = run_cli(["extract", "--run", run, "--split", "train", *CPU, "--batch-size", "128"])
    assert r.code == 2 and "do not match the file's checksum" in r.err, r.err
    r = run_cli(["fit-head", "--run", run, "--method", "joint"])
    assert r.code == 2 and "incomplete feature cache" in r.err


# --- nothing stale, nothing lost ------------------------------------------------------------------------

def test_overwrite_removes_the_old_runs_artifacts(tiny_pipeline, tmp_path):
    run = copy_run(tiny_pipeline, tmp_path / "run")
    check_ok(run_cli(["train-backbone", "--run", run, *map(str, TINY_TRAIN), "--epochs", "1", "--overwrite"]))
    assert not (run / "features").exists() and not (run / "heads").exists() and not (run / "reports").exists()
    r = run_cli(["eval", "--run", run])  # the old backbone's table is gone with its features
    assert r.code == 2 and "test.h5: features file not found" in r.err


def _imagefolder(root: Path, per_class: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", 2)):
        for c in ("a", "b"):
            for i in range(n):
                (root / split / c).mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


@pytest.mark.slow
def test_images_replaced_under_the_same_names_are_not_reused(tmp_path):
    data = _imagefolder(tmp_path / "data")
    run = tmp_path / "run"
    ltcli_in_process("train-backbone", "--run", run, "--data", f"imagefolder:{data}", "--epochs", 1, *CPU)
    ltcli_in_process("extract", "--run", run, "--split", "test", *CPU)
    img = data / "test" / "a" / "0.png"
    time.sleep(0.01)
    Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(img)  # same name, other pixels
    proc = ltcli_in_process("extract", "--run", run, "--split", "test", *CPU, expect=2)
    assert "different data_fingerprint" in proc.stderr


def _stop_after_epoch_one(run: Path) -> None:
    """Make a finished 2-epoch run look interrupted after epoch 1 (as a kill would leave it)."""
    ckpt = torch.load(run / "backbone-last.pt", weights_only=True)
    ckpt["epoch"] = 0  # 0-based: epoch 1 of 2 finished
    torch.save(ckpt, run / "backbone-last.pt")


@pytest.mark.slow
@pytest.mark.parametrize("verify, verify_on_resume", [(False, False), (True, True), (True, False)])
def test_resume_after_the_data_folder_was_re_dated(tmp_path, verify, verify_on_resume):
    """A copied or restored data folder has new modification times. Without --verify the run
    cannot tell it from changed data and says how to avoid that; a run started with --verify
    resumes (comparing bytes, as it started, whether or not --resume repeats --verify)."""
    data = _imagefolder(tmp_path / "data")
    run = tmp_path / "run"
    args = ["train-backbone", "--run", run, "--data", f"imagefolder:{data}", "--epochs", 2, *CPU]
    ltcli_in_process(*args, *(["--verify"] if verify else []))
    _stop_after_epoch_one(run)
    for img in data.rglob("*.png"):  # same bytes, new dates
        os.utime(img, ns=(img.stat().st_atime_ns, img.stat().st_mtime_ns + 10**9))
    args += ["--verify"] if verify_on_resume else []
    if verify:
        ltcli_in_process(*args, "--resume")
        assert torch.load(run / "backbone-last.pt", weights_only=True)["epoch"] == 1  # epoch 2 trained
    else:
        proc = ltcli_in_process(*args, "--resume", expect=2)
        assert "changed since the run started" in proc.stderr and "--verify" in proc.stderr


@pytest.mark.slow
def test_kill_during_extract_overwrite_keeps_the_old_file(tiny_pipeline, tmp_path):
    run = copy_run(tiny_pipeline, tmp_path / "run")
    out = run / "features" / "train.h5"
    before = sha(out)
    job = Job("extract", "--run", run, "--split", "train", *CPU, "--batch-size", "128", "--overwrite",
              LTCLI_TEST_SLOW_CHUNK="2")
    job.wait_for(r"ltcli-test: rows_done=128$")
    job.kill()
    assert sha(out) == before  # the old complete file is untouched
    check_ok(run_cli(["fit-head", "--run", run, "--method", "joint"]))
    # rerunning the same command finishes the replacement
    check_ok(run_cli(["extract", "--run", run, "--split", "train", *CPU, "--batch-size", "128", "--overwrite"]))
    assert sha(out) == before and not list(out.parent.glob(".train.h5.replacing*"))


# --- stdin is streamed and bounded ----------------------------------------------------------------------

def test_features_dash_does_not_read_an_endless_stdin(tiny_pipeline):
    path = tiny_pipeline / "features" / "train.h5"
    yes = subprocess.Popen(["yes", str(path)], stdout=subprocess.PIPE)
    try:
        proc = subprocess.run(LTCLI + ["fit-head", "--run", tiny_pipeline, "--method", "joint", "--features", "-",
                                       "--out", "/dev/null/x.pt"], stdin=yes.stdout, capture_output=True, text=True,
                              timeout=120, env=cli_env())
    finally:
        yes.kill()
    assert proc.returncode == 2 and "'-' takes one path, but stdin held 2 or more" in proc.stderr


def test_predict_refuses_an_overlong_stdin_line(tiny_pipeline):
    r = run_cli(["predict", "--run", tiny_pipeline, "-"], stdin="x" * 5000 + "\n")
    assert r.code == 2 and "-: stdin line 1 is longer than 4096 characters" in r.err


# --- exit codes: the job failing is not bad input -----------------------------------------------------------

class _FillsUp(io.FileIO):
    """A file on a disk that fills up after `room` bytes."""
    room = 1024

    def write(self, data):
        if self.tell() + len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(data)


def test_a_disk_filling_up_midway_through_a_head_exits_1(tiny_pipeline, tmp_path, monkeypatch):
    import builtins

    import ltcli.io

    run = copy_run(tiny_pipeline, tmp_path / "run")
    head = run / "heads" / "crt.pt"
    before = sha(head)
    real_open = builtins.open

    def opener(file, mode="r", *args, **kwargs):
        if "w" in mode and str(file).endswith(".tmp"):
            return io.BufferedWriter(_FillsUp(file, "w"))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(ltcli.io, "open", opener, raising=False)
    r = run_cli(["fit-head", "--run", run, "--method", "crt", "--epochs", "1"])
    assert r.code == 1, r.err
    assert r.err.strip().splitlines()[-1] == f"ltcli: failed: {head}: no space left on device (nothing was overwritten)"
    assert sha(head) == before and not list(head.parent.glob(".*.tmp"))


def test_nan_classifier_weights_are_blamed_on_the_classifier(tiny_pipeline, tmp_path):
    val = tmp_path / "val.h5"
    val.write_bytes((tiny_pipeline / "features" / "val.h5").read_bytes())
    with h5py.File(val, "r+") as f:
        f["classifier/weight"][0, 0] = np.nan
    r = run_cli(["tune-tau", "--run", tiny_pipeline, "--features", val, "--out", tmp_path / "t.pt"])
    assert r.code == 2 and "stage-1 classifier weights contain NaN or inf" in r.err, r.err


def test_atomic_writes_sync_the_folder(tmp_path, monkeypatch):
    import ltcli.io

    synced = []
    monkeypatch.setattr(ltcli.io, "fsync_dir", lambda folder: synced.append(Path(folder)))
    ltcli.io.atomic_write_text(tmp_path / "a.txt", "x")
    assert synced == [tmp_path]

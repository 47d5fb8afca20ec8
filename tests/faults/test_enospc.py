"""A full disk (ENOSPC) while saving a checkpoint, writing features or a head: exit 1 (the job
failed, not the input) with a clear
one-line message, the previous good files intact, nothing half-written left behind.

The commands run in process (`ltcli.cli.main`). Checkpoints and heads: every temporary file an
atomic save opens is /dev/full, so the kernel itself answers ENOSPC to torch's writes. Features:
h5py's dataset writes fail the way HDF5 reports a full disk (an OSError whose text carries
errno = 28)."""

from __future__ import annotations

import builtins
import shutil
from collections import namedtuple
from pathlib import Path

import h5py
import pytest

import ltcli.io
from conftest import TINY_TRAIN, copy_run, run_cli
from faultlib import sha256, temp_files, run_files as _hashes, run_logs as _logs, logs_grew as _logs_grew

pytestmark = pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")


@pytest.fixture
def full_disk(monkeypatch):
    real_open = builtins.open

    def open_on_full_disk(file, mode="r", *args, **kwargs):
        if "w" in mode and Path(file).name.endswith(".tmp"):
            return real_open("/dev/full", mode, *args, **kwargs)
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(ltcli.io, "open", open_on_full_disk, raising=False)


def _error_line(result) -> str:
    lines = result.err.strip().splitlines()
    assert result.code == 1 and lines, result.err
    assert "Traceback" not in result.err and lines[-1].startswith("ltcli: failed: "), result.err
    return lines[-1]


@pytest.mark.slow
def test_checkpoint_save_on_a_full_disk(tiny_run, tmp_path, full_disk):
    run = copy_run(tiny_run["run"], tmp_path / "run")
    before, logs = _hashes(run), _logs(run)
    args = [a for a in map(str, TINY_TRAIN)]
    args[args.index("--epochs") + 1] = "3"     # one more epoch, then its checkpoint save fails
    line = _error_line(run_cli(["train-backbone", "--run", run, *args, "--resume"]))
    assert line == f"ltcli: failed: {run}/backbone-last.pt: no space left on device (nothing was overwritten)"
    assert _hashes(run) == before and temp_files(run) == [] and _logs_grew(run, logs)


def test_head_save_on_a_full_disk(tiny_pipeline, tmp_path, full_disk):
    run = copy_run(tiny_pipeline, tmp_path / "run")
    before, logs = _hashes(run), _logs(run)
    line = _error_line(run_cli(["fit-head", "--run", run, "--method", "crt", "--epochs", "3", "--seed", "7",
                                "--device", "cpu"]))
    assert line == f"ltcli: failed: {run}/heads/crt.pt: no space left on device (nothing was overwritten)"
    line = _error_line(run_cli(["tune-tau", "--run", run, "--split", "val", "--grid", "0,0.3"]))
    assert line == f"ltcli: failed: {run}/heads/tau-norm.pt: no space left on device (nothing was overwritten)"
    line = _error_line(run_cli(["fit-head", "--run", run, "--method", "ncm", "--out", tmp_path / "new" / "ncm.pt"]))
    assert "ncm.pt: no space left on device" in line
    assert not (tmp_path / "new" / "ncm.pt").exists()
    assert _hashes(run) == before and temp_files(run) == [] and temp_files(tmp_path / "new") == []
    assert _logs_grew(run, logs)


def _h5_full_disk(monkeypatch, after_writes: int) -> None:
    real = h5py.Dataset.__setitem__
    calls = {"n": 0}

    def write(self, key, value):
        if self.name == "/features":
            calls["n"] += 1
            if calls["n"] > after_writes:
                raise OSError(
                    "Can't write data (file write failed: time = Thu Nov 26 12:00:00 2026\n, filename = "
                    "'train.h5', file descriptor = 5, errno = 28, error message = 'No space left on device', "
                    "buf = 0x55d5c0a4e000, total write size = 16384, bytes this sub-write = 16384, bytes "
                    "actually written = 18446744073709551615, offset = 0)"
                )
        return real(self, key, value)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", write)


def test_extraction_on_a_full_disk_then_resume(tiny_pipeline, tmp_path, monkeypatch):
    run = copy_run(tiny_pipeline, tmp_path / "run")
    out = run / "features" / "train.h5"
    out.unlink()
    others, logs = _hashes(run), _logs(run)
    args = ["extract", "--run", run, "--split", "train", "--device", "cpu", "--workers", "0", "--batch-size", "128"]
    with monkeypatch.context() as m:
        _h5_full_disk(m, after_writes=2)
        line = _error_line(run_cli(args))
    assert line == (f"ltcli: failed: {out}: no space left on device after 256 of 728 rows; the file is kept "
                    "incomplete: free some space and rerun `ltcli extract` to resume")
    assert {k: v for k, v in _hashes(run).items() if k != "features/train.h5"} == others
    assert _logs_grew(run, logs)
    r = run_cli(["fit-head", "--run", run, "--method", "joint"])
    assert r.code == 2 and "incomplete feature cache" in r.err
    # space freed: the same command resumes and ends with the uninterrupted file's bytes
    r = run_cli(args)
    assert r.code == 0, r.err
    assert sha256(out) == sha256(tiny_pipeline / "features" / "train.h5")


def test_extraction_refused_up_front_when_space_is_short(tiny_pipeline, tmp_path, monkeypatch):
    run = copy_run(tiny_pipeline, tmp_path / "run")
    out = run / "features" / "val.h5"
    out.unlink()
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    line = _error_line(run_cli(["extract", "--run", run, "--split", "val", "--device", "cpu", "--workers", "0"]))
    assert line.startswith(f"ltcli: failed: {out}: not enough disk space (")
    assert not out.exists() and not list(out.parent.glob(".val.h5*"))

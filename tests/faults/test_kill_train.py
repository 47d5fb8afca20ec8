"""kill -9 during `train-backbone`, then `--resume` with the same options: same final weights."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import TINY_TRAIN, read_jsonl, run_ltcli
from faultlib import Job, assert_same_weights, temp_files

pytestmark = pytest.mark.slow


def _train_until(run, pattern: str, **env) -> Job:
    job = Job("train-backbone", "--run", run, *TINY_TRAIN, **env)
    job.wait_for(pattern)
    job.kill()
    return job


def test_kill_at_a_random_step_then_resume_gives_the_same_weights(tiny_run, tmp_path):
    """The shared tiny run (2 epochs, uninterrupted) is the reference; this run is killed at a
    random step of epoch 2, after epoch 1's checkpoint, and resumed from that checkpoint."""
    run = tmp_path / "run"
    step = random.Random().randrange(6)   # the tiny run has 6 steps an epoch (728 images, batch 128)
    _train_until(run, rf"ltcli-test: epoch=1 step={step}\b", LTCLI_TEST_STEP_DELAY="0.2")
    assert not (run / "backbone.pt").exists()        # the job did not finish
    before = [e for e in read_jsonl(run / "metrics.jsonl") if e["event"] == "epoch"]
    assert [e["epoch"] for e in before] == [1]

    proc = run_ltcli("train-backbone", "--run", run, *TINY_TRAIN, "--resume")
    assert (run / "backbone.pt").is_file() and temp_files(run) == []
    events = read_jsonl(run / "metrics.jsonl")
    assert [e["resume_from_epoch"] for e in events if e["event"] == "train-start"] == [0, 1]
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == [1, 2]
    assert_same_weights(run / "backbone.pt", tiny_run["run"] / "backbone.pt")
    assert "epoch 2/2" in proc.stderr


def test_kill_while_a_checkpoint_is_renamed_then_resume(tiny_run, tmp_path):
    """Killed after epoch 2's checkpoint is written under its temporary name, before the rename:
    backbone-last.pt is still epoch 1's (intact), and resuming from it ends at the same weights."""
    run = tmp_path / "run"
    job = Job("train-backbone", "--run", run, *TINY_TRAIN, LTCLI_TEST_SLOW_WRITE="1")
    job.wait_for(r"ltcli-test: renaming .*/backbone-last\.pt$", count=2)    # epoch 2's save
    job.kill()
    assert len(temp_files(run)) == 1, "the finished temporary checkpoint was never renamed"
    assert torch.load(run / "backbone-last.pt", weights_only=True)["epoch"] == 0   # epoch 1's, intact
    assert not (run / "backbone.pt").exists()
    run_ltcli("train-backbone", "--run", run, *TINY_TRAIN, "--resume")
    assert_same_weights(run / "backbone.pt", tiny_run["run"] / "backbone.pt")


def test_kill_before_the_first_checkpoint_then_resume_or_rerun(tiny_run, tmp_path):
    """Killed in epoch 1 (run.json written, no checkpoint yet): --resume starts from epoch 0 and
    a plain rerun takes the run over; both end with the uninterrupted run's weights."""
    for how in (["--resume"], []):
        run = tmp_path / f"run{len(how)}"
        _train_until(run, r"ltcli-test: epoch=0 step=1\b", LTCLI_TEST_STEP_DELAY="0.2")
        assert (run / "run.json").exists() and not (run / "backbone-last.pt").exists()
        run_ltcli("train-backbone", "--run", run, *TINY_TRAIN, *how)
        assert_same_weights(run / "backbone.pt", tiny_run["run"] / "backbone.pt")

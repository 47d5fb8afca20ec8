"""kill -9 during `fit-head` / `tune-tau`: never a partial head where a finished one is expected.

LTCLI_TEST_SLOW_WRITE holds the finished temporary file back from its rename, so the kill lands
in the one window that matters: everything written, nothing renamed yet."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import copy_run, run_cli
from faultlib import Job, sha256, temp_files

pytestmark = pytest.mark.slow


def _kill_at_rename(name: str, *args) -> Job:
    job = Job(*args, LTCLI_TEST_SLOW_WRITE="60")
    job.wait_for(rf"ltcli-test: renaming .*/{name}$")
    job.kill()
    return job


def _loads(path):
    from ltcli.heads import load_head

    head, prov = load_head(path)
    return head


def test_fit_head_killed_leaves_no_head_then_rerun_works(tiny_pipeline, tmp_path):
    run = copy_run(tiny_pipeline, tmp_path / "run")
    (run / "heads" / "crt.pt").unlink()
    _kill_at_rename("crt.pt", "fit-head", "--run", run, "--method", "crt", "--epochs", "2", "--device", "cpu")
    assert not (run / "heads" / "crt.pt").exists()
    (tmp,) = temp_files(run / "heads")
    assert tmp.name.startswith(".crt.pt.")
    # the leftover is invisible to the stages that look for heads
    r = run_cli(["eval", "--run", run])
    assert r.code == 0, r.err
    assert set(json.loads((run / "reports" / "eval-test.json").read_text())["heads"]) == {"joint", "tau-norm"}
    r = run_cli(["fit-head", "--run", run, "--method", "crt", "--epochs", "2", "--device", "cpu"])
    assert r.code == 0 and r.out.strip() == str(run / "heads" / "crt.pt")
    _loads(run / "heads" / "crt.pt")


def test_fit_head_killed_keeps_the_previous_head(tiny_pipeline, tmp_path):
    run = copy_run(tiny_pipeline, tmp_path / "run")
    before = sha256(run / "heads" / "crt.pt")
    _kill_at_rename("crt.pt", "fit-head", "--run", run, "--method", "crt", "--epochs", "3", "--seed", "7",
                    "--device", "cpu")
    assert sha256(run / "heads" / "crt.pt") == before
    _loads(run / "heads" / "crt.pt")


def test_tune_tau_killed_keeps_the_previous_head(tiny_pipeline, tmp_path):
    run = copy_run(tiny_pipeline, tmp_path / "run")
    head = run / "heads" / "tau-norm.pt"
    before = sha256(head)
    _kill_at_rename("tau-norm.pt", "tune-tau", "--run", run, "--split", "val", "--grid", "0,0.25,1.5")
    assert sha256(head) == before
    assert torch.load(head, weights_only=True)["provenance"]["grid"] == [0.0, 0.5, 1.0, 1.5, 2.0]

    head.unlink()
    _kill_at_rename("tau-norm.pt", "tune-tau", "--run", run, "--split", "val", "--grid", "0,0.25,1.5")
    assert not head.exists()

"""kill -9 during `extract`, then rerun: byte-identical to an uninterrupted extraction; and two
extractions into one file: the second is refused, the first finishes unharmed."""

from __future__ import annotations

import random

import pytest

from conftest import copy_run, run_cli, run_ltcli
from faultlib import Job, sha256

pytestmark = pytest.mark.slow

# the options tiny_pipeline extracted its features with (the batch size is part of the file)
EXTRACT = ["--split", "train", "--device", "cpu", "--workers", "0", "--batch-size", "128"]


def _fresh_run(tiny_run, tmp_path):
    """A copy of the trained tiny run without features."""
    return copy_run(tiny_run["run"], tmp_path / "run")


def test_kill_then_rerun_is_byte_identical(tiny_run, tiny_pipeline, tmp_path):
    run = _fresh_run(tiny_run, tmp_path)
    out = run / "features" / "train.h5"
    reference = tiny_pipeline / "features" / "train.h5"      # uninterrupted, same options
    rows = random.Random().choice([128, 256, 384])          # 728 rows in batches of 128
    job = Job("extract", "--run", run, *EXTRACT, LTCLI_TEST_SLOW_CHUNK="0.5")
    job.wait_for(rf"ltcli-test: rows_done={rows}$")
    job.kill()

    # the killed file is visibly incomplete and no reader takes it for a finished cache
    info = run_ltcli("info", out, "--json").stdout
    assert '"complete": false' in info and f'"rows_done": {rows}' in info
    r = run_cli(["fit-head", "--run", run, "--method", "joint"])
    assert r.code == 2 and f"{out}: incomplete feature cache" in r.err

    proc = run_ltcli("extract", "--run", run, *EXTRACT)
    assert f"resuming {out} at row {rows} of 728" in " ".join(proc.stderr.split())
    assert proc.stdout.strip() == str(out)
    assert sha256(out) == sha256(reference)


def test_second_extract_into_the_run_waits_for_the_first(tiny_run, tiny_pipeline, tmp_path):
    """Two extractions into one run: the second waits for the run's lock, then reuses the file."""
    run = _fresh_run(tiny_run, tmp_path)
    out = run / "features" / "train.h5"
    job = Job("extract", "--run", run, *EXTRACT, LTCLI_TEST_SLOW_CHUNK="3")
    job.wait_for(r"ltcli-test: rows_done=128$")
    second = Job("extract", "--run", run, *EXTRACT)
    second.wait_for(r"waiting for ltcli process \d+")
    assert job.finish() == 0, job.stderr
    assert second.finish() == 0, second.stderr
    assert f"reusing {out}" in " ".join(second.stderr.split())
    assert sha256(out) == sha256(tiny_pipeline / "features" / "train.h5")


def test_second_writer_of_one_file_is_refused(tiny_run, tiny_pipeline, tmp_path):
    """Two runs writing one --out file: the file's own lock refuses the second at once."""
    runs = [copy_run(tiny_run["run"], tmp_path / f"run{i}") for i in range(2)]
    out = tmp_path / "shared.h5"
    job = Job("extract", "--run", runs[0], *EXTRACT, "--out", out, LTCLI_TEST_SLOW_CHUNK="0.5")
    job.wait_for(r"ltcli-test: rows_done=128$")
    for extra in ([], ["--overwrite"]):
        second = run_cli(["extract", "--run", runs[1], *EXTRACT, "--out", out, *extra])
        assert second.code == 2, second.err
        assert f"{out}: another ltcli process is writing this file" in second.err.strip().splitlines()[-1]
    assert job.finish() == 0, job.stderr
    assert sha256(out) == sha256(tiny_pipeline / "features" / "train.h5")

"""End-to-end tests of the `ltcli` command line (subprocesses, as a user runs it):
--version / --help, train-backbone for every sampling strategy, the stdout conventions
(paths only on stdout, logs on stderr, --json), real shell pipes and bad-usage exit codes."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import pytest
import torch

from conftest import LTCLI, copy_run, ltcli_in_process, read_jsonl, run_cli, run_ltcli, stdout_files, stdout_json

COMMANDS = ["train-backbone", "extract", "fit-head", "tune-tau", "eval", "info", "predict", "quickstart", "archs"]


def profile(n_max: int, classes: int, imbalance: float) -> list[int]:
    return [int(n_max * imbalance ** (-i / (classes - 1))) for i in range(classes)]


def test_version():
    proc = run_ltcli("--version")
    from ltcli import __version__

    assert proc.stdout.strip() == f"ltcli {__version__}"


def test_top_level_help_lists_every_command():
    proc = run_ltcli("--help")
    for cmd in COMMANDS:
        assert cmd in proc.stdout


def test_commands_without_a_model_do_not_import_torchvision():
    """torchvision's import is about a second: --help, info, fit-head, tune-tau and eval skip it."""
    code = ("import sys, ltcli.cli, ltcli.jobs.fit, ltcli.jobs.tune, ltcli.jobs.evaluate; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torchvision'))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("command", COMMANDS)
def test_command_help(command):
    proc = ltcli_in_process(command, "--help")
    assert "Usage" in proc.stdout and command in proc.stdout
    assert "--help" in proc.stdout


# --- train-backbone, every sampling strategy ---------------------------------------------------

SAMPLING_CLASSES = 3  # train counts 500, 50, 5: one many-, one medium-, one few-shot class


@pytest.mark.parametrize("sampling", ["instance", "class", "sqrt", "progressive"])
def test_train_backbone_each_sampling(tmp_path, sampling):
    run = tmp_path / "run"
    proc = ltcli_in_process("train-backbone", "--data", "synthetic", "--sampling", sampling, "--epochs", 1,
                     "--synthetic-classes", SAMPLING_CLASSES, "--synthetic-size", 16, "--batch-size", 128,
                     "--device", "cpu", "--workers", 0, "--run", run)
    # stdout: exactly the checkpoint path; logs on stderr
    assert [p.resolve() for p in stdout_files(proc)] == [(run / "backbone.pt").resolve()]
    assert "epoch 1/1" in proc.stderr
    for name in ("run.json", "backbone.pt", "backbone-last.pt", "metrics.jsonl"):
        assert (run / name).is_file(), name

    info = json.loads((run / "run.json").read_text())
    assert info["class_names"] == [f"class_{i:02d}" for i in range(SAMPLING_CLASSES)]
    assert info["train_counts"] == profile(500, SAMPLING_CLASSES, 100) == [500, 50, 5]
    assert info["sampling"] == sampling
    assert info["sampling_q"] == {"instance": 1.0, "class": 0.0, "sqrt": 0.5, "progressive": 0.0}[sampling]
    assert info["splits"]["train"] == sum(info["train_counts"])
    assert set(info["fingerprints"]) == {"train", "val", "test"}
    assert all(len(v) == 64 and int(v, 16) >= 0 for v in info["fingerprints"].values())
    assert info["arch"] == "resnet8" and info["image_size"] == 16 and info["feature_dim"] == 64

    events = read_jsonl(run / "metrics.jsonl")
    epochs = [e for e in events if e["event"] == "epoch"]
    assert len(epochs) == 1 and epochs[0]["epoch"] == 1 and epochs[0]["epochs"] == 1
    rec = epochs[0]
    # an epoch is len(train) samples whatever the sampler
    assert rec["samples"] == sum(info["train_counts"])
    for key in ("val_overall", "val_macro", "val_many", "val_medium", "val_few"):
        assert 0.0 <= rec[key] <= 1.0, key
    assert rec["train_loss"] > 0 and 0 <= rec["train_acc"] <= 1
    assert rec["eval_s"] > 0 and rec["checkpoint_s"] > 0  # the per-epoch work outside the steps
    assert events[-1]["event"] == "train-done"

    ckpt = torch.load(run / "backbone.pt", weights_only=True)
    assert ckpt["kind"] == "ltcli-backbone" and ckpt["num_classes"] == SAMPLING_CLASSES
    assert ckpt["model"]["fc.weight"].shape == (SAMPLING_CLASSES, 64)


def test_tiny_run_records(tiny_run):
    """The shared tiny run: counts follow the synthetic profile, one record per epoch."""
    run = tiny_run["run"]
    info = json.loads((run / "run.json").read_text())
    assert info["train_counts"] == profile(500, 5, 100) == [500, 158, 50, 15, 5]
    assert info["splits"] == {"train": 728, "val": 100, "test": 500}
    epochs = [e for e in read_jsonl(run / "metrics.jsonl") if e["event"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert all(e["samples"] == 728 for e in epochs)
    for e in epochs:
        assert {"val_overall", "val_many", "val_medium", "val_few"} <= set(e)
    # it learns something: the loss falls below chance level's ln(5)
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"] < 1.61


# --- stdout conventions -------------------------------------------------------------------------

def test_train_stdout_is_only_the_path(tiny_run):
    proc = tiny_run["proc"]
    assert stdout_files(proc) == [tiny_run["run"] / "backbone.pt"]
    assert "epoch 2/2" in proc.stderr and "epoch" not in proc.stdout


def test_commands_print_paths_or_one_json_object(tmp_path, tiny_run):
    run = copy_run(tiny_run["run"], tmp_path / "run")
    # extract: one path per split, in order
    proc = ltcli_in_process("extract", "--run", run, "--split", "train", "--split", "val", "--device", "cpu", "--workers", 0)
    assert stdout_files(proc) == [run / "features" / "train.h5", run / "features" / "val.h5"]
    # a complete file is reused and still printed; --json gives one object
    proc = ltcli_in_process("extract", "--run", run, "--split", "val", "--device", "cpu", "--json")
    assert stdout_json(proc) == {"features": [str(run / "features" / "val.h5")]}

    proc = ltcli_in_process("fit-head", "--run", run, "--method", "ncm")
    assert stdout_files(proc) == [run / "heads" / "ncm.pt"]
    proc = ltcli_in_process("fit-head", "--run", run, "--method", "ncm", "--json")
    obj = stdout_json(proc)
    assert obj["head"] == str(run / "heads" / "ncm.pt") and obj["method"] == "ncm"

    proc = ltcli_in_process("tune-tau", "--run", run, "--split", "val", "--grid", "0:1:0.5")
    paths = stdout_files(proc)
    assert paths[0] == run / "heads" / "tau-norm.pt"
    assert "best τ" in proc.stderr  # the table and the pick are on stderr
    obj = stdout_json(ltcli_in_process("tune-tau", "--run", run, "--split", "val", "--grid", "0:1:0.5", "--json"))
    assert set(obj) >= {"best", "rows", "paths"} and len(obj["rows"]) == 3

    proc = ltcli_in_process("eval", "--run", run, "--split", "val")
    assert stdout_files(proc) == [run / "reports" / "eval-val.json", run / "reports" / "eval-val-per-class.csv"]
    assert "ncm" in proc.stderr and "tau-norm" in proc.stderr  # the table

    proc = ltcli_in_process("info", run / "features" / "val.h5")
    assert proc.stdout == "" and "val" in proc.stderr


def test_shell_pipe_extract_into_fit_head(tmp_path, tiny_run):
    """The design's pipeline, through a real shell pipe: extract prints the path, fit-head reads it."""
    run = copy_run(tiny_run["run"], tmp_path / "run")
    ltcli = " ".join(shlex.quote(a) for a in LTCLI)
    r = shlex.quote(str(run))
    cmd = (f"set -o pipefail; {ltcli} extract --run {r} --split train --device cpu --workers 0 "
           f"| {ltcli} fit-head --features - --method crt --run {r}")
    proc = subprocess.run(cmd, shell=True, executable="/bin/bash", capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert stdout_files(proc) == [run / "heads" / "crt.pt"]
    assert (run / "features" / "train.h5").is_file()
    head = torch.load(run / "heads" / "crt.pt", weights_only=True)
    assert head["method"] == "crt"
    assert head["provenance"]["features"] == str(run / "features" / "train.h5")

    # the design's xargs form works too
    cmd = (f"set -o pipefail; {ltcli} extract --run {r} --split train --device cpu "
           f"| xargs -I{{}} {ltcli} fit-head --features {{}} --method joint --run {r}")
    proc = subprocess.run(cmd, shell=True, executable="/bin/bash", capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert stdout_files(proc) == [run / "heads" / "joint.pt"]


# --- bad usage: one line on stderr, exit 2, no traceback ----------------------------------------

@pytest.mark.parametrize(
    "args, culprit",
    [
        (["train-backbone", "--sampling", "bogus", "--run", "{tmp}/r"], "--sampling"),
        (["train-backbone", "--epochs", "0", "--run", "{tmp}/r"], "--epochs"),
        (["train-backbone", "--arch", "no-such-net", "--synthetic-classes", "3", "--synthetic-size", "16",
          "--device", "cpu", "--run", "{tmp}/r"], "no-such-net"),
        (["train-backbone", "--data", "imagefolder:{tmp}/missing", "--device", "cpu", "--run", "{tmp}/r"], "missing"),
        (["train-backbone", "--no-such-option"], "--no-such-option"),
        (["fit-head", "--method", "nope", "--run", "{tmp}/r"], "nope"),
        (["tune-tau", "--grid", "1:0:0.1", "--run", "{tmp}/r"], "--grid"),
        (["extract", "--run", "{tmp}/r", "--device", "cpu"], "backbone.pt"),
        (["info", "{tmp}/missing.h5"], "missing.h5"),
        (["predict", "--run", "{tmp}/r", "{tmp}/no-images"], "no-images"),
    ],
)
def test_bad_usage_exits_2_with_one_line(tmp_path, args, culprit):
    """In process through ltcli.cli.main (what the console script runs; see the subprocess
    twin below), so that the catalogue costs no interpreter start per case."""
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    r = run_cli(args)
    assert r.code == 2, r.err
    assert r.out == ""
    lines = r.err.strip().splitlines()
    assert len(lines) == 1, r.err
    assert lines[0].startswith("ltcli: error: ") and culprit in lines[0] and "Traceback" not in r.err


def test_bad_usage_in_a_subprocess(tmp_path):
    proc = run_ltcli("train-backbone", "--sampling", "bogus", "--run", tmp_path / "r", expect=2)
    assert proc.stdout == "" and proc.stderr.count("\n") == 1 and "--sampling" in proc.stderr
    assert not (tmp_path / "r").exists()
    proc = run_ltcli("no-such-command", expect=2)
    assert proc.stdout == "" and "no-such-command" in proc.stderr and "Traceback" not in proc.stderr


def test_existing_run_is_not_overwritten(tmp_path, tiny_run):
    run = copy_run(tiny_run["run"], tmp_path / "run")
    before = (run / "backbone.pt").read_bytes()
    proc = run_ltcli("train-backbone", "--synthetic-classes", 5, "--epochs", 1, "--device", "cpu",
                     "--run", run, expect=2)
    assert "--overwrite" in proc.stderr
    assert (run / "backbone.pt").read_bytes() == before


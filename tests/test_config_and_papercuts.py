"""Config files and reproducible runs, tracking, file permissions, and the command-line
papercuts of the first public round (each failed before this round)."""

from __future__ import annotations

import csv
import json
import subprocess

import pytest

from conftest import LTCLI, TINY_TRAIN, check_ok, cli_env, copy_run, run_cli, run_ltcli


def stdout_json(r):
    return json.loads(r.out)

CPU = ["--device", "cpu", "--workers", "0"]


def test_config_file_then_flags_and_the_resolved_config(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('epochs = 1\nsynthetic-classes = 3\nbatch_size = 64\nlr = 0.05\ndevice = "cpu"\nworkers = 0\n')
    run = tmp_path / "run"
    check_ok(run_cli(["train-backbone", "--config", cfg, "--lr", "0.02", "--run", run]))
    info = json.loads((run / "run.json").read_text())
    assert info["options"]["lr"] == 0.02 and info["options"]["batch_size"] == 64  # flag beats file
    assert info["options"]["epochs"] == 1 and info["num_classes"] == 3
    text = (run / "config.toml").read_text()
    assert "lr = 0.02" in text and "mixup = 0.0" in text  # every option, resolved
    for key in ("python", "torch", "torchvision", "faiss", "cuda"):
        assert key in info["environment"]


@pytest.mark.slow
def test_a_resolved_config_reproduces_the_backbone(tmp_path):
    run = tmp_path / "a"
    check_ok(run_cli(["train-backbone", "--run", run, *map(str, TINY_TRAIN), "--epochs", "1"]))
    again = tmp_path / "b"
    check_ok(run_cli(["train-backbone", "--config", run / "config.toml", "--run", again]))
    assert (run / "backbone.pt").read_bytes() == (again / "backbone.pt").read_bytes()


def test_sectioned_config_and_bad_keys(tmp_path, tiny_pipeline):
    cfg = tmp_path / "recipe.toml"
    cfg.write_text('seed = 3\n[train-backbone]\nepochs = 2\n[fit-head]\ndevice = "cpu"\n'
                   '[fit-head.crt]\nepochs = 1\nweight_decay = 0.01\n')
    run = copy_run(tiny_pipeline, tmp_path / "run")
    r = check_ok(run_cli(["fit-head", "--run", run, "--method", "crt", "--config", cfg, "--json"]))
    opts = stdout_json(r)["options"]
    assert opts["epochs"] == 1 and opts["weight_decay"] == 0.01 and opts["seed"] == 3  # shared key taken
    assert opts["batch_size"] == 512  # every option the head used, defaults included
    bad = tmp_path / "bad.toml"
    bad.write_text("epochz = 3\n")
    r = run_cli(["train-backbone", "--config", bad, "--run", tmp_path / "x"])
    assert r.code == 2 and f"{bad}: unknown option 'epochz'" in r.err
    bad.write_text("epochs = [\n")
    r = run_cli(["train-backbone", "--config", bad, "--run", tmp_path / "x"])
    assert r.code == 2 and f"{bad}: not valid TOML" in r.err
    bad.write_text('epochs = "many"\n')
    r = run_cli(["train-backbone", "--config", bad, "--run", tmp_path / "x"])
    assert r.code == 2 and "--epochs: expected a number, got 'many'" in r.err


def test_tracking_csv_tensorboard_and_log(tiny_run, tmp_path):
    run = tiny_run["run"]
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    epochs = {r["epoch"] for r in rows if r["event"] == "epoch" and r["name"] == "train_loss"}
    assert epochs == {"1", "2"}
    log = (run / "log.txt").read_text()
    assert "$ ltcli train-backbone" in log and "epoch 2/2" in log and "# exit 0" in log
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("epoch/train_loss")] == [1, 2]


def test_files_follow_the_umask(tmp_path):
    from ltcli.io import UMASK, atomic_write_text

    atomic_write_text(tmp_path / "a.json", "{}")
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~UMASK


# --- papercuts --------------------------------------------------------------------------------------

def test_no_arguments_prints_the_help_and_a_real_message():
    proc = run_ltcli(expect=2)
    assert "Usage: ltcli" in proc.stderr and proc.stderr.strip().splitlines()[-1] == \
        "ltcli: error: a command is missing (ltcli --help lists them)"


def test_help_shows_choices_and_types_not_placeholders():
    out = run_ltcli("tune-tau", "--help", env={"COLUMNS": "200"}).stdout
    assert "overall|macro|many|medium|few" in out and "<str>" not in out and "<bool>" not in out
    out = run_ltcli("fit-head", "--help").stdout  # piped: 80 columns, wrapped at words
    assert all(len(line) <= 100 for line in out.splitlines())


def test_shell_completion_is_offered():
    assert "--install-completion" in run_ltcli("--help").stdout


def test_archs_into_a_closed_pipe_exits_0():
    proc = subprocess.run(" ".join(LTCLI) + " archs | head -1", shell=True, capture_output=True, text=True,
                          env=cli_env(), executable="/bin/bash")
    ok = subprocess.run(["bash", "-c", " ".join(LTCLI) + " archs | head -1; echo ${PIPESTATUS[0]}"],
                        capture_output=True, text=True, env=cli_env())
    assert ok.stdout.splitlines()[-1] == "0" and "Traceback" not in ok.stderr + proc.stderr


def test_features_dash_with_several_paths_names_the_count(tiny_pipeline):
    paths = "\n".join(str(tiny_pipeline / "features" / f"{s}.h5") for s in ("train", "val", "test"))
    r = run_cli(["eval", "--run", tiny_pipeline, "--features", "-"], stdin=paths + "\n")
    assert r.code == 2 and "'-' takes one path, but stdin held 2 or more" in r.err


def test_fit_head_json_reports_the_options_used(tiny_pipeline, tmp_path):
    r = check_ok(run_cli(["fit-head", "--run", tiny_pipeline, "--method", "knn", "--k", "3", "--json",
                          "--out", tmp_path / "k.pt"]))
    opts = stdout_json(r)["options"]
    assert opts["k"] == 3 and opts["metric"] == "cosine" and opts["weighting"] == "distance"


def test_predict_skips_an_unreadable_image_and_has_batch_and_workers(tiny_pipeline, tmp_path):
    from PIL import Image
    import numpy as np

    good = tmp_path / "a.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(good)
    bad = tmp_path / "b.png"
    bad.write_bytes(b"not an image")
    r = run_cli(["predict", "--run", tiny_pipeline, "--batch-size", "4", "--workers", "0", "--format", "json",
                 good, bad])
    assert r.code == 2 and len(json.loads(r.out)) == 1  # the good one is labelled
    assert r.err.strip().splitlines()[-1].startswith("ltcli: error: 1 of 2 images could not be read (first: ")


def test_knn_top5_ranks_unvoted_classes_by_similarity():
    import torch

    from ltcli.featureset import FeatureSet
    from ltcli.heads import build_head

    g = torch.Generator().manual_seed(0)
    mu = torch.randn(8, 16, generator=g) * 4
    y = torch.arange(400) % 8
    x = mu[y] + torch.randn(400, 16, generator=g)
    fs = FeatureSet(x, y, None, None, [f"c{i}" for i in range(8)], torch.bincount(y), "train", {})
    head = build_head("knn", k=3).fit(fs, device="cpu")
    q = mu[:4] * 0.6 + mu[4:] * 0.4  # nearest class j (every vote), then class j + 4
    second = head.logits(q).topk(2, dim=1).indices[:, 1]
    assert second.tolist() == [4, 5, 6, 7]


def test_eval_always_shows_the_baseline(tiny_pipeline, tmp_path):
    run = copy_run(tiny_pipeline, tmp_path / "run")
    (run / "heads" / "joint.pt").unlink()
    r = check_ok(run_cli(["eval", "--run", run, "--json"]))
    assert "joint" in stdout_json(r)["heads"]

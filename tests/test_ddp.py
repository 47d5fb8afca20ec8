"""Scale-out through torchrun: 2 CPU processes (gloo) train one backbone and shard one extraction.

`torchrun --nproc-per-node 2 -m ltcli train-backbone ...` must see one sample stream split
across the ranks (an epoch is still len(train) samples), learn, and leave rank 0's files;
`torchrun ... -m ltcli extract` must give the same HDF5 features as one process."""

from __future__ import annotations

import json
import socket
import subprocess

import h5py
import numpy as np
import pytest

from conftest import TORCHRUN, cli_env, read_jsonl, run_ltcli, stdout_files

CLASSES = 5  # train counts 500, 158, 50, 15, 5 -> 728 images
TRAIN_SIZE = 728


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_ltcli(*args, nproc: int = 2, timeout: float = 900, **env) -> subprocess.CompletedProcess:
    cmd = TORCHRUN + ["--nnodes", "1", "--nproc-per-node", str(nproc), "--master_addr", "127.0.0.1",
                      "--master_port", str(free_port()), "-m", "ltcli", "--"] + [str(a) for a in args]
    # one thread per rank (torchrun's default too), stated so the single-process
    # comparison below can use the same thread count
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=cli_env(OMP_NUM_THREADS=1, **env))
    assert proc.returncode == 0, (
        f"torchrun ltcli {' '.join(map(str, args))}: exit {proc.returncode}\n"
        f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    )
    return proc


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("ddp") / "run"
    proc = torchrun_ltcli("train-backbone", "--data", "synthetic", "--synthetic-classes", CLASSES,
                          "--epochs", 2, "--batch-size", 64, "--warmup-epochs", 1, "--device", "cpu",
                          "--workers", 0, "--run", run)
    return run, proc


def test_torchrun_passes_ltcli_options_after_double_dash():
    """torchrun's argparse reads `--run` as an abbreviation of its own `--run-path` and stops
    with "ambiguous option" (Python 3.11); after `--` every argument goes to ltcli untouched,
    and ltcli drops a `--` that reaches it."""
    from torch.distributed.run import get_args_parser

    parser = get_args_parser()
    args = parser.parse_args(["--nproc-per-node", "2", "-m", "ltcli", "--", "train-backbone", "--run", "r",
                              "--log", "x"])
    assert args.module and args.training_script == "ltcli"
    assert [a for a in args.training_script_args if a != "--"] == ["train-backbone", "--run", "r", "--log", "x"]
    proc = run_ltcli("--", "--version")
    assert proc.stdout.startswith("ltcli ")


@pytest.mark.slow
def test_ddp_train_backbone(ddp_run):
    run, proc = ddp_run
    # only rank 0 prints, and only the checkpoint path
    assert stdout_files(proc) == [run / "backbone.pt"]
    for name in ("run.json", "backbone.pt", "backbone-last.pt", "metrics.jsonl"):
        assert (run / name).is_file(), name
    info = json.loads((run / "run.json").read_text())
    assert info["train_counts"] == [500, 158, 50, 15, 5]

    events = read_jsonl(run / "metrics.jsonl")
    # rank 0 alone writes metrics.jsonl: one start, one record per epoch, one done
    starts = [e for e in events if e["event"] == "train-start"]
    assert len(starts) == 1 and starts[0]["world_size"] == 2 and starts[0]["num_train"] == TRAIN_SIZE
    epochs = [e for e in events if e["event"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [1, 2]
    # both ranks together saw one epoch-long stream (each its disjoint half)
    assert [e["samples"] for e in epochs] == [TRAIN_SIZE, TRAIN_SIZE]
    assert len([e for e in events if e["event"] == "train-done"]) == 1
    # it learns: the loss falls epoch to epoch and below chance level (ln 5 = 1.609)
    assert epochs[1]["train_loss"] < epochs[0]["train_loss"] < np.log(CLASSES)
    for e in epochs:
        assert {"val_overall", "val_many", "val_medium", "val_few"} <= set(e)


@pytest.mark.slow
def test_ddp_extract_equals_single_process(ddp_run, tmp_path):
    run, _ = ddp_run
    sharded, single = tmp_path / "ddp.h5", tmp_path / "single.h5"
    proc = torchrun_ltcli("extract", "--run", run, "--split", "test", "--out", sharded, "--device", "cpu",
                          "--workers", 0, "--batch-size", 64)
    assert stdout_files(proc) == [sharded]
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".h5") == ["ddp.h5"]  # shards merged, removed
    run_ltcli("extract", "--run", run, "--split", "test", "--out", single, "--device", "cpu", "--workers", 0,
              "--batch-size", 64, env={"OMP_NUM_THREADS": 1})
    with h5py.File(sharded, "r") as a, h5py.File(single, "r") as b:
        assert a["features"].shape == b["features"].shape == (500, 64)
        assert a["features"].dtype == b["features"].dtype == np.float16
        np.testing.assert_array_equal(a["features"][()], b["features"][()])
        np.testing.assert_array_equal(a["labels"][()], b["labels"][()])
        np.testing.assert_array_equal(a["index"][()], b["index"][()])
        np.testing.assert_array_equal(a["classifier/weight"][()], b["classifier/weight"][()])
        assert bool(a.attrs["complete"]) and "shard_rank" not in a.attrs
        for key in ("split", "backbone_sha256", "data_fingerprint", "dataset_id", "class_names"):
            assert a.attrs[key] == b.attrs[key], key
    # the design goes further: the same bytes as a single-process run
    assert sharded.read_bytes() == single.read_bytes()

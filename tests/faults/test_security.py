"""No file can run code when ltcli loads it, and list files cannot reach outside their root."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from catalogue_fixtures import Evil
from conftest import cli_env, copy_run, run_cli, run_ltcli


@pytest.fixture
def crafted(tiny_pipeline, tmp_path):
    """A checkpoint and a head that look right but carry a pickled object whose unpickling
    would `touch` a marker file."""
    marker = tmp_path / "PWNED"
    ckpt = torch.load(tiny_pipeline / "backbone.pt", weights_only=True)
    head = torch.load(tiny_pipeline / "heads" / "crt.pt", weights_only=True)
    paths = {"marker": marker, "ckpt": tmp_path / "evil-backbone.pt", "head": tmp_path / "evil-head.pt",
             "ckpt_legacy": tmp_path / "evil-legacy.pt"}
    torch.save({**ckpt, "model": {**ckpt["model"], "fc.bias": Evil(marker)}}, paths["ckpt"])
    torch.save({**head, "provenance": Evil(marker)}, paths["head"])
    torch.save({**ckpt, "model": Evil(marker)}, paths["ckpt_legacy"], _use_new_zipfile_serialization=False)
    return paths


def test_the_crafted_files_really_would_run_code(crafted, tmp_path):
    """Sanity check of the test itself: a plain torch.load(weights_only=False) runs the payload."""
    code = f"import torch; torch.load({str(crafted['head'])!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", code], check=True, env=cli_env(), capture_output=True)
    assert crafted["marker"].exists()


REFUSED = "refused to load {what}: it contains pickled Python objects that could run code"


def test_crafted_checkpoints_and_heads_are_refused(crafted, tiny_pipeline, tmp_path):
    run = copy_run(tiny_pipeline, tmp_path / "run")
    img = tmp_path / "img.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(img)
    last = run / "backbone-last.pt"
    last.write_bytes(crafted["ckpt"].read_bytes())
    cases = [
        (["extract", "--run", run, "--split", "val", "--checkpoint", crafted["ckpt"]], crafted["ckpt"], "checkpoint"),
        (["extract", "--run", run, "--split", "val", "--checkpoint", crafted["ckpt_legacy"]], crafted["ckpt_legacy"],
         "checkpoint"),
        (["predict", "--run", run, "--checkpoint", crafted["ckpt"], img], crafted["ckpt"], "checkpoint"),
        (["train-backbone", "--run", run, "--resume", "--synthetic-classes", "5", "--batch-size", "128",
          "--epochs", "3", "--device", "cpu", "--workers", "0"], last, "checkpoint"),
        (["eval", "--run", run, "--heads", crafted["head"]], crafted["head"], "head"),
        (["predict", "--run", run, "--head", crafted["head"], img], crafted["head"], "head"),
    ]
    for args, culprit, what in cases:
        r = run_cli(args)
        assert r.code == 2, (args, r.err)
        assert r.err.strip().splitlines()[-1] == f"ltcli: error: {culprit}: {REFUSED.format(what=what)} " \
                                                 "(only tensors and plain values are accepted)"
        assert not crafted["marker"].exists(), f"ltcli {args[0]} ran the crafted payload"


def test_refused_even_when_torch_is_told_to_unpickle_anything(crafted, tiny_pipeline):
    """TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 turns off torch's safe default, but ltcli passes
    weights_only=True explicitly, which that variable cannot override."""
    r = run_ltcli("eval", "--run", tiny_pipeline, "--heads", crafted["head"], expect=2,
                  env={"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})
    assert "refused to load head" in r.stderr
    assert not crafted["marker"].exists()


# --- list files cannot escape their root -------------------------------------------------------------

@pytest.fixture
def list_data(tmp_path):
    root = tmp_path / "root"
    for c in "ab":
        for i in range(4):
            (root / c).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((16, 16, 3), 40 * i + (c == "b") * 100, np.uint8)).save(root / c / f"{i}.png")
    secret = tmp_path / "secret.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(secret)
    good = [f"{c}/{i}.png {int(c == 'b')}" for c in "ab" for i in range(4)]
    lists = {}
    for name, extra in (("dotdot", "a/../../secret.png 0"), ("absolute", f"{secret} 1"),
                        ("sneaky", "b/./../a/../../root/../secret.png 1")):
        lists[name] = tmp_path / f"{name}.txt"
        lists[name].write_text("\n".join(good + [extra]) + "\n")
    return root, lists


@pytest.mark.parametrize("name", ["dotdot", "absolute", "sneaky"])
def test_list_paths_outside_root_are_refused(list_data, tmp_path, name):
    root, lists = list_data
    r = run_cli(["train-backbone", "--run", tmp_path / "run", "--data", f"list:{root}:{lists[name]}",
                 "--epochs", "1", "--device", "cpu", "--workers", "0"])
    assert r.code == 2
    line = r.err.strip().splitlines()[-1]
    assert line.startswith(f"ltcli: error: {lists[name]}:9: path ") and "lies outside the data root" in line
    assert "--allow-outside-root" in line
    assert not (tmp_path / "run").exists()


def test_allow_outside_root_lets_them_in(list_data, tmp_path):
    root, lists = list_data
    run = tmp_path / "run"
    r = run_cli(["train-backbone", "--run", run, "--data", f"list:{root}:{lists['absolute']}",
                 "--allow-outside-root", "--epochs", "1", "--batch-size", "4", "--device", "cpu", "--workers", "0"])
    assert r.code == 0, r.err
    info = json.loads((run / "run.json").read_text())
    assert info["data"]["allow_outside_root"] is True and info["splits"]["train"] == 9
    # later stages read the recorded spec and flag: extract reaches the same images
    r = run_cli(["extract", "--run", run, "--split", "train", "--device", "cpu", "--workers", "0"])
    assert r.code == 0, r.err

"""Issue 2's real-data check through the CLI: CIFAR-10-LT (IF 100, 20 val images per class) from
the JPEG copy in ../shared/data/cifar10, one epoch of resnet32 (skipped when the copy is absent)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import read_jsonl, run_ltcli, stdout_files

CIFAR10_JPEG = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"

pytestmark = [
    pytest.mark.realdata,
    pytest.mark.slow,
    pytest.mark.skipif(not (CIFAR10_JPEG / "train").is_dir(), reason=f"{CIFAR10_JPEG} absent"),
]


def test_train_backbone_cifar10_lt_if100(tmp_path):
    run = tmp_path / "run"
    proc = run_ltcli("train-backbone", "--data", f"imagefolder:{CIFAR10_JPEG}", "--imbalance-factor", 100,
                     "--val-per-class", 20, "--arch", "resnet32", "--epochs", 1, "--batch-size", 256,
                     "--device", "cpu", "--workers", 2, "--run", run, timeout=1800)
    assert stdout_files(proc) == [run / "backbone.pt"]
    info = json.loads((run / "run.json").read_text())
    assert info["class_names"] == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                   "ship", "truck"]
    # 20 per class held out first, so n_max = 5000 - 20 and the profile scales from there
    n_max, c = 4980, 10
    expected = [int(n_max * 100 ** (-i / (c - 1))) for i in range(c)]
    assert info["train_counts"] == expected == [4980, 2985, 1789, 1072, 643, 385, 231, 138, 83, 49]
    counts = np.array(info["train_counts"])
    assert counts[0] / counts[-1] == pytest.approx(100, rel=0.02)  # max/min = IF (up to int rounding)
    assert np.all(np.diff(counts) < 0)
    assert info["splits"] == {"train": 12355, "val": 200, "test": 10000}
    assert info["image_size"] == 32 and info["feature_dim"] == 64 and info["arch"] == "resnet32"
    assert set(info["fingerprints"]) == {"train", "val", "test"}
    assert info["data"]["spec"].startswith("imagefolder:") and info["data"]["imbalance_factor"] == 100

    epochs = [e for e in read_jsonl(run / "metrics.jsonl") if e["event"] == "epoch"]
    assert len(epochs) == 1 and epochs[0]["samples"] == 12355
    rec = epochs[0]
    for key in ("val_overall", "val_many", "val_medium"):
        assert 0.0 <= rec[key] <= 1.0
    # with the default thresholds (many > 100, few < 20) CIFAR-10-LT has no few-shot class
    assert rec["val_few"] is None
    assert (run / "backbone.pt").stat().st_size > 100_000  # 0.46M parameters

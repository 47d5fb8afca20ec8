"""The example scripts run as written (their configs' heavy settings overridden by flags where
a test must be small): iNaturalist's shape, with classes of 2 images."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, cli_env

pytestmark = pytest.mark.slow


def inat_fixture(root: Path, train_counts=(12, 8, 5, 3, 2, 2), val_per_class=2) -> Path:
    """An iNat-2018-shaped root: COCO-style train2018.json / val2018.json and their images."""
    rng = np.random.default_rng(0)
    images, annotations = {"train": [], "val": []}, {"train": [], "val": []}
    next_id = 1
    for split, counts in (("train", train_counts), ("val", [val_per_class] * len(train_counts))):
        for c, n in enumerate(counts):
            for i in range(n):
                rel = f"train_val2018/Plantae/{c}/{split}{i}.jpg"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                img = np.clip(rng.normal(60 * c, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(root / rel, quality=90)
                images[split].append({"id": next_id, "file_name": rel})
                annotations[split].append({"image_id": next_id, "category_id": 100 + c})
                next_id += 1
    cats = [{"id": 100 + c, "name": f"species_{c}"} for c in range(len(train_counts))]
    for split in ("train", "val"):
        (root / f"{split}2018.json").write_text(json.dumps({"images": images[split],
                                                             "annotations": annotations[split], "categories": cats}))
    return root


def test_inaturalist_example_runs_on_an_inat_shaped_fixture(tmp_path):
    root = inat_fixture(tmp_path / "inat")
    run = tmp_path / "run"
    env = cli_env(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run(["bash", str(REPO / "examples" / "inaturalist.sh"), str(root), str(run),
                           "--arch", "resnet8", "--epochs", "1", "--batch-size", "8", "--workers", "0",
                           "--device", "cpu"], capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((run / "run.json").read_text())
    # 2-image classes give 1 image to val and keep 1 for train; iNat's val is the test split
    assert info["train_counts"] == [10, 6, 3, 1, 1, 1] and info["splits"]["val"] == 2 + 2 + 2 + 2 + 1 + 1
    assert info["splits"]["test"] == 12
    report = json.loads((run / "reports" / "eval-test.json").read_text())
    assert {"joint", "ncm", "crt", "lws", "knn", "tau-norm", "logit-adjust"} <= set(report["heads"])

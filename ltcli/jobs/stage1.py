"""A stage-1 classifier for features whose backbone ltcli did not train.

Such features come without one (`extract --arch`, `import-features`), yet the baseline and
the heads that re-balance a stage-1 classifier (τ-norm, LWS, logit adjustment) need it. The
baseline head then fits itself as an instance-balanced linear probe on the train features
(the cRT recipe with instance sampling), and the probe is written into every split's file as
its /classifier, recorded in the `stage1` attribute, so every stage works unchanged."""

from __future__ import annotations

from ..cache import read_features, rewrite_with_classifier
from ..console import err_console
from ..heads import baseline_method, build_head
from ..rundir import RunDir

SPLITS = ("train", "val", "test")


def ensure_stage1(run_dir: RunDir) -> None:
    """Fit the probe on RUN/features/train.h5 if it has no classifier, and give every complete
    split file of the run the train file's classifier."""
    train_path = run_dir.features("train")
    fs = read_features(train_path, mmap=True)
    if fs.weight is None:
        head = build_head(baseline_method()).fit(fs)
        weight, bias = head.linear()
        stage1 = head.stage1_note
        err_console.print(f"no stage-1 classifier: fitted {stage1} on {train_path}", highlight=False)
        rewrite_with_classifier(train_path, weight, bias, stage1)
    else:
        weight, bias, stage1 = fs.weight, fs.bias, fs.attrs.get("stage1") or "trained"
    for name in SPLITS[1:]:
        path = run_dir.features(name)
        if path.exists() and read_features(path, mmap=True).weight is None:
            rewrite_with_classifier(path, weight, bias, stage1)

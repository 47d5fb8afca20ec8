"""Saving and loading heads: round trips, refusal of pickled code, malformed files."""

from __future__ import annotations

import os

import pytest
import torch

from ltcli.errors import LtcliError
from ltcli.featureset import FeatureSet
from ltcli.heads import available_methods, build_head, load_head, save_head

OPTIONS = {
    "joint": {},
    "crt": {"epochs": 2, "seed": 3},
    "lws": {"epochs": 2},
    "tau-norm": {"tau": 0.7, "keep_bias": True},
    "ncm": {"metric": "euclidean"},
    "logit-adjust": {"tau": 0.5},
    "knn": {"k": 3},
}


def train_set(n=120, c=4, d=9):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    y = torch.arange(n) % c
    return FeatureSet(x, y, torch.randn(c, d, generator=g), torch.randn(c, generator=g),
                      [f"c{i}" for i in range(c)], torch.bincount(y, minlength=c), "train", {})


@pytest.mark.parametrize("method", available_methods())
def test_round_trip_gives_identical_logits(tmp_path, method):
    fs = train_set()
    head = build_head(method, **OPTIONS[method]).fit(fs, device="cpu")
    path = tmp_path / "heads" / f"{method}.pt"
    save_head(head, path, {"features": "train.h5", "backbone_sha256": "ab" * 32, "epoch": 3})
    loaded, prov = load_head(path)
    assert type(loaded) is type(head) and loaded.options == head.options
    assert prov["epoch"] == 3 and loaded.class_names == fs.class_names
    assert torch.equal(loaded.logits(fs.features), head.logits(fs.features))
    assert not [p for p in os.listdir(path.parent) if p.endswith(".tmp")]  # atomic write left no temp


def test_knn_bank_stored_as_float16_when_lossless(tmp_path):
    fs = train_set()
    fs.features = fs.features.half().float()
    head = build_head("knn").fit(fs)
    assert head.bank.dtype == torch.float16
    assert build_head("knn").fit(train_set()).bank.dtype == torch.float32


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/ltcli-pwned",))


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": 1, "method": "joint", "state": _Evil(), "provenance": {}}, path)
    with pytest.raises(LtcliError, match=r"refused to load head"):
        load_head(path)
    assert not os.path.exists("/tmp/ltcli-pwned")


def _valid_payload():
    head = build_head("joint").fit(train_set())
    return {"format": 1, "method": "joint", "options": {}, "state": head.state(), "provenance": {}}


def _mutate(payload, how):
    state = payload["state"]
    if how == "not-a-dict":
        return [1, 2, 3]
    if how == "no-method":
        del payload["method"]
    elif how == "bad-format":
        payload["format"] = 2
    elif how == "unknown-method":
        payload["method"] = "svm"
    elif how == "weight-shape":
        state["weight"] = torch.zeros(3, 3)
    elif how == "weight-type":
        state["weight"] = [[0.0] * 9] * 4
    elif how == "weight-nan":
        state["weight"] = torch.full((4, 9), float("nan"))
    elif how == "dim-type":
        state["dim"] = "nine"
    elif how == "names":
        state["class_names"] = ["a"]
    elif how == "options":
        state["options"] = {"tau": 1.0}
    elif how == "provenance":
        payload["provenance"] = "x"
    return payload


@pytest.mark.parametrize("how,message", [
    ("not-a-dict", "not an ltcli head file"),
    ("no-method", "missing 'method'"),
    ("bad-format", "head format 2 is not supported"),
    ("unknown-method", "unknown head method 'svm'"),
    ("weight-shape", r"'weight' has shape \(3, 3\), expected \(4, 9\)"),
    ("weight-type", "'weight' is a list, expected a tensor"),
    ("weight-nan", "'weight' contains NaN"),
    ("dim-type", "'dim' missing or not an integer"),
    ("names", "1 class names for 4 classes"),
    ("options", "--tau: does not apply to --method joint"),
    ("provenance", "provenance is not a dict"),
])
def test_malformed_head_files(tmp_path, how, message):
    path = tmp_path / "head.pt"
    torch.save(_mutate(_valid_payload(), how), path)
    with pytest.raises(LtcliError, match=message) as err:
        load_head(path)
    assert str(err.value).startswith(str(path))


def test_missing_truncated_and_foreign_files(tmp_path):
    with pytest.raises(LtcliError, match="head not found"):
        load_head(tmp_path / "nope.pt")
    path = tmp_path / "head.pt"
    save_head(build_head("joint").fit(train_set()), path, {})
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(LtcliError, match="not a valid head"):
        load_head(path)
    torch.save(torch.zeros(3), path)
    with pytest.raises(LtcliError, match="not an ltcli head file"):
        load_head(path)


def test_save_refuses_non_plain_provenance(tmp_path):
    head = build_head("joint").fit(train_set())
    with pytest.raises(TypeError, match="plain values only"):
        save_head(head, tmp_path / "h.pt", {"path": tmp_path})
    assert not (tmp_path / "h.pt").exists()

"""Backbones and features from elsewhere, models out: timm architectures, local weight files,
extract with a checkpoint ltcli did not train (linear-probe baseline), import-features,
export to a self-contained file, and predict agreeing with eval."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from conftest import TINY_CLASSES, check_ok, copy_run, ltcli_in_process, run_cli
from ltcli.cache import read_features
from ltcli.data import DataConfig, load_dataset
from ltcli.heads import HEADS, load_head, methods

CPU = ["--device", "cpu", "--workers", "0"]


@pytest.fixture(scope="module")
def r18(tmp_path_factory) -> Path:
    """A torchvision resnet18 state_dict saved to disk, as a user would have one."""
    path = tmp_path_factory.mktemp("w") / "resnet18.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def test_pngs(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """The tiny run's synthetic test images as PNG files (lossless), in split order."""
    ds = load_dataset(DataConfig(num_classes=TINY_CLASSES))
    images = ds.split("test").images
    folder = tmp_path_factory.mktemp("png")
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:04d}.png")
    return folder, images


@pytest.mark.slow
def test_timm_arch_trains_and_extracts(tmp_path):
    run = tmp_path / "run"
    ltcli_in_process("train-backbone", "--run", run, "--arch", "timm:resnet18", "--epochs", 1, "--synthetic-classes", 3,
              "--synthetic-size", 16, "--batch-size", 128, *CPU)
    info = json.loads((run / "run.json").read_text())
    assert info["arch"] == "timm:resnet18" and info["feature_dim"] == 512
    ltcli_in_process("extract", "--run", run, "--split", "test", *CPU)
    assert read_features(run / "features" / "test.h5").dim == 512


def test_weights_file_is_loaded_and_mismatches_named(r18, tmp_path):
    from ltcli.errors import LtcliError
    from ltcli.models import build_model

    ref = torch.load(r18, weights_only=True)
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in ref.items()}}, wrapped)
    from safetensors.torch import save_file

    st = tmp_path / "r18.safetensors"
    save_file(ref, str(st))
    for path in (r18, wrapped, st):
        net = build_model("resnet18", 3, weights=str(path))
        assert torch.equal(net.encoder.layer1[0].conv1.weight, ref["layer1.0.conv1.weight"])
    with pytest.raises(LtcliError, match=rf"^{r18}: weights do not fit resnet34 \(\d+ missing, first 'layer1.2"):
        build_model("resnet34", 3, weights=str(r18))
    bad = tmp_path / "bad.pt"
    torch.save({"something": [1, 2]}, bad)
    with pytest.raises(LtcliError, match="holds no state dict of named tensors"):
        build_model("resnet18", 3, weights=str(bad))


@pytest.mark.slow
def test_train_backbone_fine_tunes_from_a_weights_file(r18, tmp_path):
    run = tmp_path / "run"
    ltcli_in_process("train-backbone", "--run", run, "--arch", "resnet18", "--weights", r18, "--epochs", 1,
              "--synthetic-classes", 3, "--synthetic-size", 16, *CPU)
    info = json.loads((run / "run.json").read_text())
    assert info["weights"] == str(r18)


@pytest.mark.slow
def test_extract_with_a_foreign_checkpoint_then_every_head(r18, tmp_path):
    run = tmp_path / "run"
    check_ok(run_cli(["extract", "--run", run, "--arch", "resnet18", "--checkpoint", r18, "--split", "all",
                      "--synthetic-classes", TINY_CLASSES, *CPU]))
    for split in ("train", "val", "test"):
        fs = read_features(run / "features" / f"{split}.h5")
        assert fs.weight is not None and fs.attrs["stage1"].startswith("linear probe")
    for m in methods():
        if HEADS[m].tunable:
            check_ok(run_cli(["tune-tau", "--run", run, "--method", m, "--grid", "0:1:0.5"]))
        else:
            check_ok(run_cli(["fit-head", "--run", run, "--method", m, *HEADS_FAST(m), "--device", "cpu"]))
    head, prov = load_head(run / "heads" / "joint.pt")
    assert prov["stage1"].startswith("linear probe")
    r = check_ok(run_cli(["eval", "--run", run, "--json"]))
    assert set(json.loads(r.out)["heads"]) == set(methods())
    # an ltcli run's own backbone is never mixed with a foreign one
    other = run_cli(["extract", "--run", run, "--arch", "resnet18", "--checkpoint", r18])
    assert other.code == 0  # the same foreign backbone: reused


def HEADS_FAST(method: str) -> list[str]:
    return [x for k, v in HEADS[method].fast_options.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def _dump(fs, path: Path, with_classifier: bool) -> None:
    arrays = {"features": fs.features.numpy(), "labels": fs.labels.numpy()}
    if with_classifier:
        arrays.update(weight=fs.weight.numpy(), bias=fs.bias.numpy())
    np.savez(path, **arrays)


@pytest.mark.slow
def test_imported_features_give_the_same_numbers(tiny_pipeline, tmp_path):
    """Features written out with numpy and imported back: every head, tune-tau and eval give
    the numbers of the same features as ltcli extracted them."""
    orig = copy_run(tiny_pipeline, tmp_path / "orig")
    names = read_features(orig / "features" / "train.h5").class_names
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n")
    run = tmp_path / "imported"
    for split in ("train", "val", "test"):
        fs = read_features(orig / "features" / f"{split}.h5")
        src = tmp_path / f"{split}.npz"
        _dump(fs, src, with_classifier=True)
        extra = ["--class-names", tmp_path / "names.txt"] if split == "train" else []
        check_ok(run_cli(["import-features", src, "--split", split, "--run", run, "--classifier", src, *extra]))
    for r in (orig, run):
        for m in methods():
            if HEADS[m].tunable:
                check_ok(run_cli(["tune-tau", "--run", r, "--method", m, "--grid", "0:2:0.25"]))
            else:
                check_ok(run_cli(["fit-head", "--run", r, "--method", m, *HEADS_FAST(m), "--device", "cpu"]))
    a = json.loads(check_ok(run_cli(["eval", "--run", orig, "--json"])).out)["heads"]
    b = json.loads(check_ok(run_cli(["eval", "--run", run, "--json"])).out)["heads"]
    for m in methods():
        for k in ("overall", "macro", "many", "medium", "few", "top5"):
            assert a[m][k] == b[m][k], (m, k)
    info = run_cli(["info", run / "features" / "train.h5", "--json"])
    assert json.loads(info.out)["provenance"]["stage1"] == "imported"
    # mixing an imported run's heads with the original features is refused
    mixed = run_cli(["eval", "--run", orig, "--heads", run / "heads" / "crt.pt"])
    assert mixed.code == 2 and "come from different backbones" in mixed.err


def test_import_without_a_classifier_fits_a_probe(tmp_path):
    g = np.random.default_rng(0)
    mu = g.normal(size=(3, 8)) * 4
    y = np.repeat([0, 1, 2], [60, 20, 5])
    x = (mu[y] + g.normal(size=(len(y), 8))).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    run = tmp_path / "run"
    check_ok(run_cli(["import-features", tmp_path / "x.npy", "--labels", tmp_path / "y.npy", "--run", run]))
    fs = read_features(run / "features" / "train.h5")
    assert fs.weight.shape == (3, 8) and fs.attrs["stage1"].startswith("linear probe")
    check_ok(run_cli(["fit-head", "--run", run, "--method", "joint"]))
    assert (load_head(run / "heads" / "joint.pt")[0].predict(torch.from_numpy(x)) == torch.from_numpy(y)).float() \
        .mean() > 0.9


@pytest.mark.parametrize("make,message", [
    (lambda p: np.save(p, np.array([np.zeros(3), np.zeros(2)], dtype=object), allow_pickle=True),
     "holds an object (ragged or pickled) array"),
    (lambda p: np.save(p, np.where(np.arange(40).reshape(10, 4) == 21, np.nan, 1.0)),
     "features contain NaN or inf (first at row 5)"),
    (lambda p: np.save(p, np.ones((10,))), "features have shape (10,), expected N x D or N x K x D"),
])
def test_bad_arrays_are_refused_in_one_line(tmp_path, make, message):
    make(tmp_path / "x.npy")
    np.save(tmp_path / "y.npy", np.arange(10) % 2)
    r = run_cli(["import-features", tmp_path / "x.npy", "--labels", tmp_path / "y.npy", "--run", tmp_path / "r"])
    assert r.code == 2 and message in r.err and len(r.err.strip().splitlines()) == 1, r.err


def test_bad_labels_are_refused(tmp_path):
    np.save(tmp_path / "x.npy", np.ones((10, 4), np.float32))
    for labels, message in ((np.arange(9), "9 labels for 10 feature rows"), (np.arange(10) - 1, "label -1 is negative"),
                            (np.arange(10) * 0.5, "labels are not integers")):
        np.save(tmp_path / "y.npy", labels)
        r = run_cli(["import-features", tmp_path / "x.npy", "--labels", tmp_path / "y.npy", "--run", tmp_path / "r"])
        assert r.code == 2 and message in r.err, r.err


# --- models out, and predict against eval ------------------------------------------------------------

EXPORTABLE = [m for m in methods() if HEADS[m].linear_form or m == "ncm"]


@pytest.fixture(scope="module")
def all_heads(tiny_pipeline, tmp_path_factory) -> Path:
    run = copy_run(tiny_pipeline, tmp_path_factory.mktemp("heads") / "run")
    for m in methods():
        if HEADS[m].tunable:
            check_ok(run_cli(["tune-tau", "--run", run, "--method", m, "--grid", "0:2:0.5"]))
        else:
            check_ok(run_cli(["fit-head", "--run", run, "--method", m, *HEADS_FAST(m), "--device", "cpu"]))
    return run


def _predict_labels(run, head, folder) -> list[str]:
    r = check_ok(run_cli(["predict", "--run", run, "--head", head, "--format", "json", "--workers", "0",
                          "--device", "cpu", folder]))
    return [row["labels"][0] for row in json.loads(r.out)]


@pytest.mark.slow
@pytest.mark.parametrize("method", methods())
def test_predict_agrees_with_eval(all_heads, test_pngs, method):
    folder, _ = test_pngs
    fs = read_features(all_heads / "features" / "test.h5")
    head, _ = load_head(all_heads / "heads" / f"{method}.pt")
    want = [fs.class_names[i] for i in head.predict(fs.features).tolist()]
    assert _predict_labels(all_heads, method, folder) == want


LOAD_PT2 = textwrap.dedent('''
    import json, sys, numpy as np, torch
    extra = {"ltcli.json": ""}
    model = torch.export.load(sys.argv[1], extra_files=extra).module()
    meta = json.loads(extra["ltcli.json"])
    images = torch.from_numpy(np.load(sys.argv[2])).permute(0, 3, 1, 2).contiguous()
    top1 = model(images).argmax(1).tolist()
    assert not any(m == "ltcli" or m.startswith("ltcli.") for m in sys.modules)  # plain torch only
    print(json.dumps([meta["class_names"][i] for i in top1]))
''')


@pytest.mark.slow
@pytest.mark.parametrize("method", EXPORTABLE)
def test_exported_model_reproduces_predict(all_heads, test_pngs, method, tmp_path):
    folder, images = test_pngs
    out = tmp_path / f"{method}.pt2"
    check_ok(run_cli(["export", "--run", all_heads, "--head", method, "--out", out]))
    np.save(tmp_path / "images.npy", images)
    proc = subprocess.run([sys.executable, "-c", LOAD_PT2, out, tmp_path / "images.npy"], capture_output=True,
                          text=True, timeout=600, cwd=tmp_path, env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout) == _predict_labels(all_heads, method, folder)


def test_knn_cannot_be_exported(all_heads, tmp_path):
    r = run_cli(["export", "--run", all_heads, "--head", "knn", "--out", tmp_path / "k.pt2"])
    assert r.code == 2 and "cannot be exported" in r.err


@pytest.mark.slow
def test_onnx_export_reproduces_predict(all_heads, test_pngs, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    folder, images = test_pngs
    out = tmp_path / "crt.onnx"
    check_ok(run_cli(["export", "--run", all_heads, "--head", "crt", "--format", "onnx", "--out", out]))
    sess = ort.InferenceSession(str(out))
    x = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    scores = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    names = read_features(all_heads / "features" / "test.h5").class_names
    assert [names[i] for i in scores.argmax(1)] == _predict_labels(all_heads, "crt", folder)


def test_python_api(tiny_pipeline):
    import ltcli

    train = ltcli.read_features(tiny_pipeline / "features" / "train.h5")
    test = ltcli.read_features(tiny_pipeline / "features" / "test.h5")
    head = ltcli.build_head("crt", epochs=1).fit(train, device="cpu")
    m = ltcli.compute_metrics(head.logits(test.features), test.labels, test.train_counts)
    assert 0 <= m["overall"] <= 1 and set(ltcli.methods()) == set(methods())
    fs = ltcli.feature_set(train.features.numpy(), train.labels.numpy(), class_names=train.class_names,
                           train_counts=train.train_counts)
    same = ltcli.build_head("crt", epochs=1).fit(fs, device="cpu")
    assert torch.equal(same.weight, head.weight)

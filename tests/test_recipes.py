"""Stage-1 regularisers and stage-2 smoothing: mixup / cutmix, label smoothing, balanced softmax,
label-aware smoothing (MiSLAS), cRT from the joint classifier."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_TRAIN, check_ok, run_cli
from ltcli.featureset import FeatureSet
from ltcli.heads import build_head
from ltcli.heads._balanced import smoothing_per_class, softmax_minus_onehot
from ltcli.mixing import MixedBatch, log_prior, mix_batch, training_loss


def _batch(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g)


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_mixed_batches_are_convex_pairs_and_keep_the_class_frequencies(kind):
    x, y = _batch()
    m = mix_batch(x, y, np.random.default_rng(1), **{kind: 1.0})
    assert m.kind == kind and 0.0 <= m.lam <= 1.0
    # the partners are a permutation of the batch: each label once as y_a, once as y_b
    assert sorted(m.perm.tolist()) == list(range(len(y))) and torch.equal(m.y_b, y[m.perm])
    assert torch.equal(torch.bincount(m.y_b, minlength=5), torch.bincount(y, minlength=5))
    partner = x[m.perm]
    if kind == "mixup":  # every pixel: the convex combination of the image and its partner
        assert torch.allclose(m.x, m.lam * x + (1 - m.lam) * partner, atol=1e-6)
    else:  # every pixel from the image or its partner; λ is the image's share of them
        own = (m.x == x).all(dim=1)
        assert (own | (m.x == partner).all(dim=1)).all()
        assert math.isclose(own[0].float().mean().item(), m.lam, abs_tol=1e-6)


def test_switching_uses_both_and_no_mixing_is_the_identity():
    x, y = _batch()
    kinds = {mix_batch(x, y, np.random.default_rng(s), mixup=1.0, cutmix=1.0, switch_prob=0.5).kind for s in range(20)}
    assert kinds == {"mixup", "cutmix"}
    plain = mix_batch(x, y, np.random.default_rng(0))
    assert plain.x is x and plain.lam == 1.0 and torch.equal(plain.y_b, y) and plain.kind == "none"


def test_balanced_softmax_is_cross_entropy_on_logits_shifted_by_the_log_prior():
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(32, 5, generator=g), torch.randint(0, 5, (32,), generator=g)
    counts = [500, 200, 50, 10, 2]
    prior = log_prior(counts)
    got = training_loss(z, MixedBatch(None, y, y, 1.0), loss="balanced-softmax", prior=prior)
    want = F.cross_entropy(z + torch.log(torch.tensor(counts, dtype=torch.float64) / sum(counts)).float(), y)
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(got, F.cross_entropy(z, y))
    mixed = training_loss(z, MixedBatch(None, y, y.flip(0), 0.3), label_smoothing=0.1)
    want = 0.3 * F.cross_entropy(z, y, label_smoothing=0.1) + 0.7 * F.cross_entropy(z, y.flip(0), label_smoothing=0.1)
    assert torch.allclose(mixed, want, atol=1e-6)


def test_label_aware_smoothing_interpolates_between_head_and_tail_by_count():
    counts = [1000, 500, 100, 10]
    eps = smoothing_per_class({"las_eps_head": 0.4, "las_eps_tail": 0.1}, counts, torch.device("cpu"))
    assert eps[0].item() == pytest.approx(0.4) and eps[-1].item() == pytest.approx(0.1)
    assert all(0.1 - 1e-6 <= e <= 0.4 + 1e-6 for e in eps.tolist()) and eps.tolist() == sorted(eps.tolist(), reverse=True)
    frac = (500 - 10) / (1000 - 10)
    assert eps[1].item() == pytest.approx(0.1 + 0.3 * math.sin(math.pi / 2 * frac), rel=1e-5)
    assert smoothing_per_class({"label_smoothing": 0.2}, counts, torch.device("cpu")).tolist() == \
        pytest.approx([0.2] * 4)
    assert smoothing_per_class({}, counts, torch.device("cpu")) is None


def test_smoothed_gradient_equals_autograd():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(16, 4, generator=g, requires_grad=True)
    y = torch.randint(0, 4, (16,), generator=g)
    eps = torch.tensor([0.3, 0.2, 0.1, 0.0])
    target = (1 - eps[y])[:, None] * F.one_hot(y, 4) + eps[y][:, None] / 4
    loss = -(target * F.log_softmax(z, dim=1)).sum(1).sum()
    loss.backward()
    got = softmax_minus_onehot(z.detach(), y, torch.full((16, 1), -1.0), eps)
    assert torch.allclose(got, z.grad, atol=1e-6)


def _fs():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(4, 8, generator=g) * 3
    y = torch.cat([torch.full((n,), j) for j, n in enumerate([200, 60, 20, 6])])
    x = mu[y] + torch.randn(len(y), 8, generator=g)
    return FeatureSet(x, y, mu * 0.5, torch.zeros(4), list("abcd"), torch.bincount(y), "train", {})


def test_crt_and_lws_take_the_smoothing_options():
    fs = _fs()
    for method in ("crt", "lws"):
        plain = build_head(method, epochs=2).fit(fs, device="cpu")
        las = build_head(method, epochs=2, las_eps_head=0.3, las_eps_tail=0.0).fit(fs, device="cpu")
        assert not torch.equal(plain.linear()[0], las.linear()[0])
    with pytest.raises(Exception, match="give both"):
        build_head("crt", las_eps_head=0.3).fit(fs, device="cpu")
    joint = build_head("crt", init="joint", epochs=1, lr=1e-8).fit(fs, device="cpu")
    assert torch.allclose(joint.weight, fs.weight, atol=1e-5)  # started from the stage-1 classifier


@pytest.mark.slow
def test_train_backbone_records_the_regularisers(tmp_path):
    run = tmp_path / "run"
    check_ok(run_cli(["train-backbone", "--run", run, *map(str, TINY_TRAIN), "--mixup", "1.0", "--cutmix", "1.0",
                      "--mixup-off-epochs", "1", "--label-smoothing", "0.1", "--loss", "balanced-softmax"]))
    import json

    info = json.loads((run / "run.json").read_text())
    for key, value in (("mixup", 1.0), ("cutmix", 1.0), ("mixup_off_epochs", 1), ("label_smoothing", 0.1),
                       ("loss", "balanced-softmax")):
        assert info["options"][key] == value and info["train_config"][key] == value
    assert "loss = \"balanced-softmax\"" in (run / "config.toml").read_text()

"""Backbones: shapes and feature dims, torchvision names, errors, resnet32 size."""

from __future__ import annotations

import urllib.error

import pytest
import torch
import torchvision

from ltcli.errors import LtcliError
from ltcli.models import LTNet, available_archs, build_model


@pytest.mark.parametrize("arch", ["resnet8", "resnet20", "resnet32", "resnet56"])
def test_cifar_resnets(arch):
    m = build_model(arch, 10)
    assert isinstance(m, LTNet) and m.arch == arch and m.feature_dim == 64 and m.num_classes == 10
    x = torch.randn(2, 3, 32, 32)
    assert m.features(x).shape == (2, 64)
    assert m(x).shape == (2, 10)


def test_resnet32_size_and_init():
    m = build_model("resnet32", 10)
    n = sum(p.numel() for p in m.parameters())
    assert 0.45e6 < n < 0.47e6, n  # 0.46M as in He et al. / LDAM
    conv = m.encoder.conv1.weight
    # Kaiming normal (fan_out, relu): std = sqrt(2 / (16 * 3 * 3))
    assert abs(conv.std().item() - (2 / 144) ** 0.5) < 0.05


def test_resnet10():
    m = build_model("resnet10", 5)
    assert m.feature_dim == 512
    x = torch.randn(2, 3, 64, 64)
    assert m.features(x).shape == (2, 512) and m(x).shape == (2, 5)
    assert sum(isinstance(b, torchvision.models.resnet.BasicBlock) for b in m.modules()) == 4


@pytest.mark.parametrize(
    "arch,dim",
    [("resnet18", 512), ("mobilenet_v3_small", 1024), ("efficientnet_b0", 1280), ("squeezenet1_1", 512), ("googlenet", 1024)],
)
def test_torchvision_models(arch, dim):
    m = build_model(arch, 7)
    assert m.feature_dim == dim and m.arch == arch
    m.train()  # training mode too: googlenet must not return its aux-logit tuple
    x = torch.randn(2, 3, 64, 64)
    assert m.features(x).shape == (2, dim)
    assert m(x).shape == (2, 7)
    assert set(k for k in m.state_dict() if k.startswith("fc.")) == {"fc.weight", "fc.bias"}
    assert m.state_dict()["fc.weight"].shape == (7, dim)


def test_arch_name_is_case_insensitive():
    assert build_model(" ResNet8 ", 3).arch == "resnet8"


def test_available_archs():
    archs = available_archs()
    assert archs[:1] == ["resnet8"]
    for name in ("resnet32", "resnet10", "resnet50", "vit_b_16", "convnext_tiny"):
        assert name in archs
    assert len(archs) == len(set(archs))


def test_unknown_arch():
    with pytest.raises(LtcliError, match=r"^--arch resnet33: unknown architecture; did you mean .*`ltcli archs` lists all\)$"):
        build_model("resnet33", 10)
    with pytest.raises(LtcliError, match=r"^--arch zzzz: unknown architecture \(try resnet32"):
        build_model("zzzz", 10)


def test_weights_errors():
    with pytest.raises(LtcliError, match="^--weights IMAGENET1K_V1: resnet32 has no pretrained weights"):
        build_model("resnet32", 10, weights="IMAGENET1K_V1")
    with pytest.raises(LtcliError, match=r"^--weights NOPE: unknown weights for resnet18 \(has: IMAGENET1K_V1, DEFAULT\)$"):
        build_model("resnet18", 10, weights="NOPE")


def test_weights_download_failure(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(LtcliError, match=r"^--weights IMAGENET1K_V1: the weights of resnet18 could not be fetched \(URLError"):
        build_model("resnet18", 10, weights="IMAGENET1K_V1")


def test_weights_are_loaded(monkeypatch):
    # A fake "download": the real state dict of a resnet18 with constant conv1 weights.
    state = torchvision.models.resnet18().state_dict()
    state["conv1.weight"].fill_(0.125)
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", lambda *a, **k: state)
    m = build_model("resnet18", 4, weights="ResNet18_Weights.IMAGENET1K_V1")
    assert torch.all(m.encoder.conv1.weight == 0.125)
    assert m.fc.weight.shape == (4, 512)


def test_seed_makes_init_repeatable_without_touching_global_rng():
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    a, b = build_model("resnet8", 3, seed=1), build_model("resnet8", 3, seed=1)
    assert torch.equal(torch.random.get_rng_state(), before)
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(pa, pb)
    c = build_model("resnet8", 3, seed=2)
    assert not torch.equal(a.fc.weight, c.fc.weight)


def test_channels_last_and_bf16_autocast():
    m = build_model("resnet8", 10).to(memory_format=torch.channels_last)  # same blocks as resnet32
    x = torch.randn(4, 3, 32, 32).to(memory_format=torch.channels_last)
    ref = m.eval()(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.25 * ref.abs().max() + 0.1
    m.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(m(x), torch.arange(4))
    loss.backward()
    assert m.encoder.conv1.weight.grad is not None

"""Backbones: an encoder giving a D-dim feature and a linear classifier on top (LTNet).

Any torchvision classification model works (its last nn.Linear becomes the feature
boundary), plus the small nets of the long-tail literature:
  * resnet8/20/32/44/56/110: CIFAR ResNets of He et al. (2016) as used by LDAM (Cao et al.
    2019): 3 stages of (depth − 2)/6 BasicBlocks, widths 16/32/64, 64-d features, option-A
    (parameter-free, zero-padded identity) shortcuts. resnet32 is the CIFAR-LT standard
    (0.46M parameters); resnet8 is a fast net for CPU runs on the synthetic data.
  * resnet10: torchvision ResNet(BasicBlock, [1, 1, 1, 1]), 512-d, the paper's ImageNet-LT net.
  * timm:NAME: any model of timm's registry (its classifier removed: num_classes=0).

Weights (`--weights`): a torchvision weight name (IMAGENET1K_V1, DEFAULT), `pretrained` for
timm's default weights (both need a hub to download from), or a local file (`ltcli.weights`).
"""

from __future__ import annotations

import difflib
import pickle

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock as TVBasicBlock
from torchvision.models.resnet import ResNet

from ltcli.errors import LtcliError
from ltcli.weights import is_weights_file, load_encoder_weights

_CIFAR_DEPTHS = {"resnet8": 8, "resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56, "resnet110": 110}
CUSTOM_ARCHS = (*_CIFAR_DEPTHS, "resnet10")


class LTNet(nn.Module):
    """encoder: image -> N x D feature; fc: Linear(D, C). forward = fc(features(x))."""

    def __init__(self, encoder: nn.Module, feature_dim: int, num_classes: int, arch: str) -> None:
        super().__init__()
        self.encoder = encoder
        self.fc = nn.Linear(feature_dim, num_classes)
        self.feature_dim = feature_dim
        self.num_classes = num_classes
        self.arch = arch
        # False for a backbone ltcli did not train: its fc is a fresh layer, not a stage-1 classifier
        self.has_classifier = True

    def features(self, x: Tensor) -> Tensor:
        return self.encoder(x).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


# ---------------------------------------------------------------- CIFAR ResNets (LDAM)
class _CifarBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        # Option A: subsample and zero-pad the channels, no parameters (He et al. CIFAR nets).
        self.pad = planes - in_planes if stride != 1 or in_planes != planes else 0
        self.stride = stride

    def shortcut(self, x: Tensor) -> Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad:
            x = F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return x

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """Feature extractor of a CIFAR ResNet: 3 stages, widths 16/32/64, global average pool."""

    def __init__(self, depth: int) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(n):
                layers.append(_CifarBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.feature_dim = 64
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def _resnet10() -> tuple[nn.Module, int]:
    # torchvision's ResNet init is Kaiming (fan_out) already.
    net = ResNet(TVBasicBlock, [1, 1, 1, 1])
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim


# ---------------------------------------------------------------- torchvision models
def _torchvision_names() -> list[str]:
    return torchvision.models.list_models(module=torchvision.models)


TIMM_PREFIX = "timm:"


def available_archs(timm: bool = False) -> list[str]:
    """Every name build_model accepts: the custom nets first, then torchvision's (sorted), then
    (timm=True) timm's as timm:NAME."""
    names = list(CUSTOM_ARCHS) + sorted(set(_torchvision_names()) - set(CUSTOM_ARCHS))
    if timm:
        import timm as _timm

        names += [TIMM_PREFIX + n for n in _timm.list_models()]
    return names


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def _strip_classifier(model: nn.Module, arch: str) -> tuple[int, str]:
    """Replace the final classifier by Identity in place; (feature dim D, its module name)."""
    # Auxiliary heads (googlenet, inception_v3) would make the training-mode output a tuple.
    if hasattr(model, "aux_logits"):
        model.aux_logits = False
        for aux in ("aux1", "aux2", "AuxLogits"):
            if getattr(model, aux, None) is not None:
                setattr(model, aux, None)
    if arch.startswith("squeezenet"):
        # Its classifier is a 1x1 conv to C channels; the feature is the pooled 512-d input.
        dim = model.classifier[1].in_channels
        model.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        return dim, "classifier"
    # Classifiers are registered last in every torchvision model (fc, classifier, heads, head),
    # so the last nn.Linear in registration order is the one that gives the logits.
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise LtcliError(f"--arch {arch}: cannot find its classifier layer to replace")
    name, last = linears[-1]
    _set_submodule(model, name, nn.Identity())
    return last.in_features, name


def _dummy_side(arch: str, weights) -> int:
    """Smallest input side the model accepts (from torchvision's weight metadata), >= 32."""
    try:
        enum = torchvision.models.get_model_weights(arch)
        metas = [weights.meta] if weights is not None else [w.meta for w in enum]
        side = min(max(m.get("min_size", (32, 32))) for m in metas)
    except (ValueError, KeyError):
        side = 224
    return max(side, 32)


def _verify_dim(encoder: nn.Module, dim: int, side: int, arch: str) -> None:
    was_training = encoder.training
    encoder.eval()  # batch 1 in eval mode: BatchNorm needs no batch statistics
    try:
        with torch.no_grad():
            out = encoder(torch.zeros(1, 3, side, side))
    finally:
        encoder.train(was_training)
    if out.flatten(1).shape != (1, dim):
        raise LtcliError(
            f"--arch {arch}: unexpected feature shape {tuple(out.shape)} after removing its classifier"
        )


def _build_torchvision(arch: str, weights: str | None) -> tuple[nn.Module, int]:
    enum = torchvision.models.get_model_weights(arch)
    w = None
    if weights is not None and not is_weights_file(weights):
        try:
            w = enum.verify(weights)
        except (KeyError, ValueError, TypeError):
            names = ", ".join(enum.__members__) or "none"
            raise LtcliError(f"--weights {weights}: unknown weights for {arch} (has: {names})") from None
    kwargs = {}
    if w is None and arch in ("googlenet", "inception_v3"):
        kwargs["init_weights"] = True  # silences torchvision's FutureWarning; same init
    try:
        model = torchvision.models.get_model(arch, weights=w, **kwargs)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        if w is None:
            raise
        raise LtcliError(
            f"--weights {weights}: the weights of {arch} could not be fetched ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else 'no detail'}); download them where there is a "
            f"network into {torch.hub.get_dir()}/checkpoints"
        ) from None
    dim, classifier = _strip_classifier(model, arch)
    if is_weights_file(weights):
        load_encoder_weights(model, weights, arch, classifier)
    _verify_dim(model, dim, _dummy_side(arch, w), arch)
    return model, dim


def _build_timm(name: str, arch: str, weights: str | None) -> tuple[nn.Module, int]:
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=1)
        hint = f"; did you mean timm:{close[0]}?" if close else ""
        raise LtcliError(f"--arch {arch}: unknown timm model{hint} (`ltcli archs --timm` lists them)")
    pretrained = weights is not None and not is_weights_file(weights)
    if pretrained and weights not in ("pretrained", "DEFAULT"):
        raise LtcliError(f"--weights {weights}: for a timm model give 'pretrained' (timm's default weights) or "
                         "a local weights file")
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=0)
    except Exception as exc:  # hub and network errors come in many types
        if not pretrained:
            raise LtcliError(f"--arch {arch}: timm cannot build it ({str(exc).splitlines()[0][:120]})") from None
        raise LtcliError(
            f"--weights {weights}: timm could not fetch {name}'s pretrained weights from the hub "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else 'no detail'}); without a "
            "network, download them elsewhere and pass the file with --weights PATH"
        ) from None
    if is_weights_file(weights):
        classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
        load_encoder_weights(model, weights, arch, classifier)
    return model, int(model.num_features)


def check_input_size(model: nn.Module, size: int, arch: str) -> None:
    """A dry forward of two images of the side training will use: an architecture that cannot
    take it (a ViT's fixed patch grid, a net that pools below 1 px) is refused by name now, not
    by an assertion deep in the model an epoch later."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, 3, size, size))
    except (RuntimeError, AssertionError, ValueError, IndexError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:140]
        raise LtcliError(f"--arch {arch}: cannot take {size} px images ({reason}); choose another --image-size "
                         "or --arch") from None
    finally:
        model.train(was_training)
    if not torch.isfinite(out).all():
        raise LtcliError(f"--arch {arch}: gives NaN or inf on {size} px images")


def build_model(arch: str, num_classes: int, weights: str | None = None, seed: int | None = None) -> LTNet:
    """An LTNet for `arch` with a fresh Linear(D, num_classes) classifier.

    `weights` is a torchvision weight name ("IMAGENET1K_V1", "DEFAULT", ...) loaded into the
    encoder. `seed`, if given, makes the random init repeatable without touching the global
    torch RNG state."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    name = arch.strip().lower()
    if seed is None:
        return _build(name, arch, num_classes, weights)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build(name, arch, num_classes, weights)


def _build(name: str, arch: str, num_classes: int, weights: str | None) -> LTNet:
    if name.startswith(TIMM_PREFIX):
        encoder, dim = _build_timm(arch.strip()[len(TIMM_PREFIX):], arch, weights)
        name = TIMM_PREFIX + arch.strip()[len(TIMM_PREFIX):]
    elif name in CUSTOM_ARCHS:
        if weights is not None and not is_weights_file(weights):
            raise LtcliError(f"--weights {weights}: {name} has no pretrained weights (only torchvision models do)")
        if name == "resnet10":
            encoder, dim = _resnet10()
        else:
            encoder = CifarResNet(_CIFAR_DEPTHS[name])
            dim = encoder.feature_dim
        if is_weights_file(weights):
            load_encoder_weights(encoder, weights, arch, "fc")
    elif name in _torchvision_names():
        encoder, dim = _build_torchvision(name, weights)
    else:
        close = difflib.get_close_matches(name, available_archs(), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise LtcliError(
            f"--arch {arch}: unknown architecture{hint} (try resnet32, resnet10, resnet50, ... ; "
            "`ltcli archs` lists all)"
        )
    return LTNet(encoder, dim, num_classes, name)

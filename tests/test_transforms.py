"""On-device augmentation and normalisation; torchvision transforms for large images."""

from __future__ import annotations

import torch
from PIL import Image

from ltcli.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    augment_batch,
    describe_transform,
    normalize_batch,
    test_transform as make_test_transform,
    train_transform,
)


def reference(x: torch.Tensor, dy: int, dx: int, flip: bool, pad: int = 4) -> torch.Tensor:
    """One image by hand: zero-pad, crop at (dy, dx), then flip (a flip of a crop at mirrored
    offsets is the same distribution as crop-after-flip)."""
    h, w = x.shape[1:]
    out = torch.nn.functional.pad(x, (pad, pad, pad, pad))[:, dy:dy + h, dx:dx + w]
    return out.flip(2) if flip else out


def test_augment_matches_some_crop_and_flip():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 256, (64, 3, 8, 8), dtype=torch.uint8)  # no zeros inside the images
    y = augment_batch(x, g)
    assert y.shape == x.shape and y.dtype == torch.uint8
    seen = set()
    for i in range(len(x)):
        matches = [(dy, dx, f) for dy in range(9) for dx in range(9) for f in (False, True)
                   if torch.equal(reference(x[i], dy, dx, f), y[i])]
        assert matches, f"image {i} is no pad-4 crop/flip of its input"
        seen.update(matches)
    assert len({m[2] for m in seen}) == 2 and len({m[0] for m in seen}) > 3  # offsets and flips vary


def test_augment_float_seeded_and_in_place_safe():
    x = torch.rand(16, 3, 32, 32)
    keep = x.clone()
    a = augment_batch(x, torch.Generator().manual_seed(3))
    b = augment_batch(x, torch.Generator().manual_seed(3))
    c = augment_batch(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c) and torch.equal(x, keep)
    assert a.dtype == torch.float32
    # zero padding enters at most 4 rows/cols: the centre 24x24 always comes from the image
    assert (a[:, :, 4:28, 4:28] > 0).all()


def test_augment_channels_last_and_default_generator():
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8).to(memory_format=torch.channels_last)
    assert augment_batch(x).shape == (4, 3, 32, 32)


def test_normalize_batch():
    x = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    x[:, :, 0, 0] = 255
    y = normalize_batch(x)
    assert y.dtype == torch.float32 and y.shape == x.shape
    for ch in range(3):
        assert torch.allclose(y[0, ch, 1, 1], torch.tensor(-IMAGENET_MEAN[ch] / IMAGENET_STD[ch]))
        assert torch.allclose(y[0, ch, 0, 0], torch.tensor((1 - IMAGENET_MEAN[ch]) / IMAGENET_STD[ch]))
    assert normalize_batch(x, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_torchvision_transforms_and_description():
    img = Image.new("RGB", (300, 200), (10, 20, 30))
    assert make_test_transform()(img).shape == (3, 224, 224)
    assert train_transform(64)(img).shape == (3, 64, 64)
    d = describe_transform(make_test_transform())
    assert "\n" not in d and "Resize(size=256" in d and "CenterCrop(size=(224, 224))" in d
    assert describe_transform(size=32, augment=True) == "tensor 32px: pad4-crop+hflip, normalize(imagenet mean/std)"
    assert describe_transform(size=32) == "tensor 32px: normalize(imagenet mean/std)"

"""Image transforms.

Small images (side <= 64) live on the device as uint8 tensors: `augment_batch` (pad-4
random crop + horizontal flip, the CIFAR recipe) runs there, vectorised over the batch,
then `normalize_batch` turns them into float. Large images use torchvision transforms in
DataLoader workers (`train_transform` / `test_transform`)."""

from __future__ import annotations

import functools
import re

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PAD = 4


def augment_batch(x: torch.Tensor, generator: torch.Generator | None = None, pad: int = PAD) -> torch.Tensor:
    """Random crop after zero padding by `pad` pixels, plus a random horizontal flip.

    x: N x C x H x W (uint8 or float, any device); returns the same shape and dtype. Apply it
    to the uint8 images before normalize_batch so the padding is black, as in the CIFAR recipe.
    Random numbers come from `generator` (on its own device) so runs are repeatable."""
    n, c, h, w = x.shape
    gdev = generator.device if generator is not None else x.device
    offsets = torch.randint(0, 2 * pad + 1, (2, n), generator=generator, device=gdev).to(x.device)
    flip = (torch.rand(n, generator=generator, device=gdev) < 0.5).to(x.device)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = offsets[0, :, None] + torch.arange(h, device=x.device)            # N x H
    cols = offsets[1, :, None] + torch.arange(w, device=x.device)            # N x W
    cols = torch.where(flip[:, None], cols.flip(1), cols)                    # flip = read columns backwards
    # gather rows then columns: one indexed copy each, no per-image loop
    idx_r = rows[:, None, :, None].expand(n, c, h, w + 2 * pad)
    out = padded.gather(2, idx_r)
    idx_c = cols[:, None, None, :].expand(n, c, h, w)
    return out.gather(3, idx_c)


@functools.lru_cache(maxsize=16)
def _norm_constants(device: torch.device, mean: tuple, std: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    # built once per device: a fresh torch.tensor(list, device="cuda") each batch is a
    # host-to-device copy that synchronises the stream
    shift = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1).mul(255.0).to(device)
    scale = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1).mul(255.0).to(device)
    return shift, scale


def normalize_batch(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 N x 3 x H x W in [0, 255] -> `dtype`, (x / 255 - mean) / std per channel."""
    shift, scale = _norm_constants(x.device, tuple(mean), tuple(std))
    return ((x.to(torch.float32) - shift) / scale).to(dtype)


def train_transform(size: int = 224):
    """Large-image training: RandomResizedCrop + flip + ToTensor + Normalize (ImageNet)."""
    from torchvision import transforms as T

    return T.Compose([
        T.RandomResizedCrop(size),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def test_resize(size: int = 224) -> int:
    """The short side test_transform resizes to before its centre crop (256 for 224)."""
    return round(size * 256 / 224)


def test_transform(size: int = 224):
    """Large-image evaluation: Resize(size * 256 / 224) + CenterCrop(size) + ToTensor + Normalize.

    Load the images with `Split.load(i, draft=test_resize(size))`: big JPEGs then decode at
    reduced scale, still at least that side."""
    from torchvision import transforms as T

    return T.Compose([
        T.Resize(test_resize(size)),
        T.CenterCrop(size),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def describe_transform(transform=None, *, size: int | None = None, augment: bool = False) -> str:
    """One line recording how images were prepared (for run.json / HDF5 attrs).

    With a torchvision transform: its repr on one line. Without: the on-device tensor
    pipeline, e.g. 'tensor 32px: pad4-crop+hflip, normalize(imagenet)'."""
    if transform is not None:
        return re.sub(r"\s+", " ", repr(transform)).replace("( ", "(").replace(" )", ")").strip()
    steps = [f"pad{PAD}-crop+hflip"] if augment else []
    steps.append("normalize(imagenet mean/std)")
    side = f"{size}px" if size else "native size"
    return f"tensor {side}: " + ", ".join(steps)

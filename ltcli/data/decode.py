"""Decode a split once into a uint8 tensor, so training on small images is never bound
by JPEG decoding. File-backed splits decode in parallel DataLoader workers."""

from __future__ import annotations

import os
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import LtcliError
from .types import Split


def fit_image(img: Image.Image, size: int) -> np.ndarray:
    """RGB image -> size x size x 3 uint8: shorter side resized to `size`, centre crop."""
    w, h = img.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), Image.BILINEAR)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8)


def _open_fit(split: Split, i: int, size: int) -> np.ndarray:
    return fit_image(split.load(i, draft=size), size)


class _Chunks(torch.utils.data.Dataset):
    """Item k = images [k*chunk, (k+1)*chunk) decoded, with an ok mask and error messages."""

    def __init__(self, split: Split, size: int, chunk: int) -> None:
        self.split, self.size, self.chunk = split, size, chunk

    def __len__(self) -> int:
        return -(-len(self.split) // self.chunk)

    def __getitem__(self, k: int):
        lo, hi = k * self.chunk, min(len(self.split), (k + 1) * self.chunk)
        out = np.zeros((hi - lo, self.size, self.size, 3), dtype=np.uint8)
        ok = np.ones(hi - lo, dtype=bool)
        errors = []
        for j in range(hi - lo):
            try:
                out[j] = _open_fit(self.split, lo + j, self.size)
            except LtcliError as exc:
                ok[j] = False
                errors.append(str(exc))
        return lo, torch.from_numpy(out), torch.from_numpy(ok), errors


def _identity(x):
    return x


def _resize_tensor(x: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 N x 3 x H x W -> N x 3 x size x size (antialiased bilinear, in chunks)."""
    out = torch.empty((x.shape[0], 3, size, size), dtype=torch.uint8)
    for lo in range(0, x.shape[0], 1024):
        part = F.interpolate(x[lo : lo + 1024].float(), size=(size, size), mode="bilinear",
                             antialias=True, align_corners=False)
        out[lo : lo + 1024] = part.round().clamp_(0, 255).to(torch.uint8)
    return out


def decode_split(
    split: Split,
    size: int | None = None,
    skip_bad: bool = False,
    workers: int = 0,
    progress: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, np.ndarray]:
    """Decode every image once: (uint8 N x 3 x S x S tensor, kept indices).

    Images that are not S x S get their shorter side resized to S and a centre crop;
    `size=None` takes S from the first readable image. A bad image raises LtcliError naming
    it, or with skip_bad is left out (kept indices say which positions remain).
    `progress(n)` is called with the number of images finished so far."""
    n = len(split)
    if split.images is not None:
        x = torch.from_numpy(np.ascontiguousarray(split.images)).permute(0, 3, 1, 2).contiguous()
        if size is not None and tuple(x.shape[2:]) != (size, size):
            x = _resize_tensor(x, size)
        if progress:
            progress(n)
        return x, np.arange(n, dtype=np.int64)

    if n == 0:
        return torch.empty((0, 3, size or 0, size or 0), dtype=torch.uint8), np.arange(0)
    if size is None:
        size = _first_side(split, skip_bad)
    # more worker processes than CPUs only adds start-up cost (and a DataLoader warning on stderr)
    workers = max(0, min(workers, _cpu_count()))
    chunk = int(np.clip(n // max(1, workers * 8), 32, 512))
    loader = torch.utils.data.DataLoader(
        _Chunks(split, size, chunk), batch_size=None, shuffle=False, num_workers=workers,
        collate_fn=_identity, persistent_workers=False,
    )
    out = torch.empty((n, size, size, 3), dtype=torch.uint8)
    ok = np.ones(n, dtype=bool)
    done = 0
    for lo, images, mask, errors in loader:
        if errors and not skip_bad:
            raise LtcliError(errors[0])
        out[lo : lo + len(images)] = images
        ok[lo : lo + len(images)] = mask.numpy()
        done += len(images)
        if progress:
            progress(done)
    kept = np.flatnonzero(ok)
    if len(kept) < n:
        out = out[torch.from_numpy(kept)]
    return out.permute(0, 3, 1, 2).contiguous(), kept


def _first_side(split: Split, skip_bad: bool) -> int:
    """The shorter side of the first readable image of the split."""
    for i in range(len(split)):
        try:
            w, h = split.load(i).size
            return min(w, h)
        except LtcliError:
            if not skip_bad:
                raise
    raise LtcliError(f"split {split.name}: no readable image")


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1

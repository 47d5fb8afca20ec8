"""JPEG decoding, resizing and centre-cropping on the device (`extract --gpu-decode`).

DataLoader workers only read file bytes and pack a batch into ONE uint8 tensor plus lengths
(`pack_bytes`), so a batch crosses the process boundary as two shared-memory tensors rather
than hundreds. The main process decodes the batch with nvJPEG's batched decoder, then resizes
each group of same-sized images with one interpolate call (`resize_crop`), which for photo
collections (a handful of common sizes) is a few calls per batch instead of one per image.

The same functions run on the CPU (torchvision's libjpeg decoder); the tests use that to
check the results against the PIL test transform."""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

JPEG_MAGIC = b"\xff\xd8\xff"


def pack_bytes(blobs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate 1-D uint8 tensors into one, with their lengths."""
    lengths = torch.tensor([len(b) for b in blobs], dtype=torch.int64)
    return torch.cat(list(blobs)) if len(blobs) else torch.zeros(0, dtype=torch.uint8), lengths


def unpack_bytes(flat: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
    """The inverse of pack_bytes: contiguous 1-D views, one per file."""
    return list(torch.split(flat, lengths.tolist()))


def resize_crop(images: Sequence[torch.Tensor], size: int, resize: int, out: torch.Tensor) -> torch.Tensor:
    """Resize each uint8 3 x H x W image so its short side is `resize` (bilinear, antialias),
    centre-crop `size` x `size`, and write it to out[i] (uint8, B x 3 x size x size).

    Same-sized images are resized together in one call."""
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, img in enumerate(images):
        groups[tuple(img.shape[-2:])].append(i)
    for (h, w), members in groups.items():
        short, long = min(h, w), max(h, w)
        new_long = int(resize * long / short)
        nh, nw = (resize, new_long) if h <= w else (new_long, resize)
        x = torch.stack([images[i] for i in members]).float()
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
        x = x[:, :, top : top + size, left : left + size].round_().clamp_(0, 255).to(torch.uint8)
        idx = torch.tensor(members)
        if out.is_cuda:  # from pinned memory: a pageable copy would wait for the stream
            idx = idx.pin_memory().to(out.device, non_blocking=True)
        out.index_copy_(0, idx, x)
    return out


def decode_batch(datas: Sequence[torch.Tensor], device: torch.device,
                 fallback: Callable[[int, torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
    """Decode file bytes to uint8 RGB 3 x H x W tensors on `device`.

    JPEGs go through torchvision's batched decoder on `device`; anything it cannot decode
    (PNG, CMYK or otherwise unsupported JPEGs, corrupt files) goes to fallback(i, bytes), which
    returns the image (on any device) or raises the error that names the file."""
    from torchvision.io import ImageReadMode, decode_jpeg

    jpeg = [i for i, d in enumerate(datas) if bytes(d[:3].tolist()) == JPEG_MAGIC]
    decoded: dict[int, torch.Tensor] = {}
    if jpeg:
        try:
            decoded.update(zip(jpeg, decode_jpeg([datas[i] for i in jpeg], mode=ImageReadMode.RGB, device=device)))
        except RuntimeError:
            for i in jpeg:  # find the culprit(s); the others are decoded one by one
                try:
                    if device.type == "cuda":
                        torch.cuda.current_stream(device).synchronize()
                    decoded[i] = decode_jpeg(datas[i], mode=ImageReadMode.RGB, device=device)
                except RuntimeError:
                    pass
    return [decoded[i] if i in decoded else fallback(i, d).to(device) for i, d in enumerate(datas)]


def cpu_fallback(load_pil: Callable[[int], object]) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """A decode_batch fallback: torchvision's CPU decoder, then PIL (whose error names the file)."""
    from torchvision.io import ImageReadMode, decode_image

    def fallback(i: int, data: torch.Tensor) -> torch.Tensor:
        try:
            return decode_image(data, mode=ImageReadMode.RGB)
        except RuntimeError:
            img = load_pil(i)
            return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)

    return fallback


class DeviceDecoder:
    """Decode + resize + crop batches of file bytes on one device, safely on CUDA.

    nvJPEG's hardware decoder writes its outputs without waiting for the work queued on its
    stream (pytorch/vision#9606, meta-pytorch/torchcodec#1634): given a block of the caching
    allocator that queued kernels still read, it corrupts that memory (seen as NaN features).
    So on CUDA decoding runs on a side stream that is drained before every decode (only the
    previous batch's resizes are queued there, never the forward), and the batch handed to the
    main stream is marked with record_stream so its memory is not reused early."""

    def __init__(self, device: torch.device, size: int, resize: int):
        self.device, self.size, self.resize = device, size, resize
        self.side = torch.cuda.Stream(device) if device.type == "cuda" else None

    def __call__(self, datas: Sequence[torch.Tensor], fallback) -> torch.Tensor:
        if self.side is None:
            return self._decode(datas, fallback)
        main = torch.cuda.current_stream(self.device)
        self.side.synchronize()
        with torch.cuda.stream(self.side):
            out = self._decode(datas, fallback)
        main.wait_stream(self.side)
        out.record_stream(main)
        return out

    def _decode(self, datas, fallback) -> torch.Tensor:
        out = torch.empty((len(datas), 3, self.size, self.size), dtype=torch.uint8, device=self.device)
        return resize_crop(decode_batch(datas, self.device, fallback), self.size, self.resize, out)

"""The one input pipeline: how a split's images reach the backbone at test time.

Used by train-backbone's per-epoch val pass, `extract` and `predict`, so the three feed the
network exactly the same tensors:

- the side the backbone sees and where images live (`input_size`): images up to
  SMALL_IMAGE_MAX px are decoded once into a uint8 tensor (on the device on CUDA) and
  normalised there; larger ones stream through DataLoader workers, resized (short side to
  round(S·256/224)) and centre-cropped, big JPEGs decoded at reduced scale (JPEG draft), or
  decoded on the GPU with `gpu_decode`;
- with `views` K > 1 each image gives K seeded augmented views (train augmentation);
- `forward_features` runs the backbone with the precision (autocast) and memory format
  (channels_last on CUDA) every stage uses.

A source yields (start, stop, [views of N x 3 x S x S normalised float tensors]) for rows of
the split in the batches of a fixed grid 0, B, 2B, ... (so a resumed extraction repeats the
batches of an uninterrupted one)."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from .console import progress_bar
from .device_decode import DeviceDecoder, cpu_fallback, pack_bytes, unpack_bytes
from .errors import LtcliError
from .runtime import autocast, to_channels_last
from .transforms import (augment_batch, describe_transform, normalize_batch, test_resize, test_transform,
                         train_transform)

SMALL_IMAGE_MAX = 64  # images up to this side are decoded once into memory
LARGE_IMAGE_SIZE = 224  # the side larger images are fed at unless --image-size says otherwise


def input_size(native: int | None, requested: int | None = None) -> tuple[int, bool]:
    """(side the backbone sees, decoded in memory?) for images whose native side is `native`
    (None when unknown): native size for CIFAR-sized images, 224 for photos."""
    size = requested or (native if native and native <= SMALL_IMAGE_MAX else LARGE_IMAGE_SIZE)
    return int(size), size <= SMALL_IMAGE_MAX


def probe_native_size(split) -> int | None:
    """Side of the first readable image, so CIFAR-sized JPEG folders train at 32 px, not 224."""
    if split.images is not None:
        return int(max(split.images.shape[1:3]))
    for i in range(min(len(split), 8)):
        try:
            with split.load(i) as im:
                return max(im.size)
        except LtcliError:
            continue
    return None


def mix_seed(*values: int) -> int:
    """A 63-bit seed from several integers (independent streams per (seed, view, row))."""
    return int(np.random.SeedSequence([int(v) & 0xFFFFFFFF for v in values]).generate_state(2, np.uint64)[0] >> 1)


def batch_ranges(start: int, stop: int, batch_size: int) -> Iterator[tuple[int, int]]:
    """[s, e) for the batches of the global grid 0, B, 2B, ... that lie in [start, stop)."""
    s = start
    while s < stop:
        e = min(stop, (s // batch_size + 1) * batch_size)
        yield s, e
        s = e


class Bar:
    """A progress bar context that is a no-op when progress is off."""

    def __init__(self, on: bool):
        self.bar = progress_bar() if on else None

    def __enter__(self):
        if self.bar is not None:
            self.bar.__enter__()
        return self.bar

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)


def open_source(split, *, size: int, in_memory: bool, device: torch.device, views: int = 1, seed: int = 0,
                workers: int = 0, skip_bad: bool = False, gpu_decode: bool = False, progress: bool = False):
    """The source of a split's batches (in memory or streamed, as `input_size` decided)."""
    if in_memory:
        return MemorySource(split, size, skip_bad, workers, device, views, seed, progress)
    kept = scan_readable(split, workers) if skip_bad and split.paths is not None else np.arange(len(split))
    return FileSource(split, kept, size, workers, device, views, seed, gpu_decode)


@torch.inference_mode()
def forward_features(model: torch.nn.Module, xs: list[torch.Tensor], device: torch.device,
                     amp: torch.dtype | None) -> torch.Tensor:
    """Backbone features of a batch: N x D for one view, N x K x D for K views."""
    with autocast(device, amp):
        feats = [model.features(x) for x in xs]
    return feats[0] if len(feats) == 1 else torch.stack(feats, dim=1)


def prepare_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Eval mode on the device, channels_last on CUDA: how every stage runs the backbone."""
    model.eval().to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return model


# --- in memory ---------------------------------------------------------------------------------


class MemorySource:
    """The whole split decoded once into a uint8 N x 3 x S x S tensor (on the device on CUDA).

    When the rows and the side are known without decoding (no skip_bad), decoding waits for
    the first batch, so a reused cache file costs nothing."""

    def __init__(self, split, size, skip_bad, workers, device, views, seed, progress=False):
        self.split, self.size, self.skip_bad, self.workers = split, size, skip_bad, workers
        self.device, self.views, self.seed, self.progress = device, views, seed, progress
        self.images = None
        if skip_bad:
            self._decode()
        else:
            self.kept = np.arange(len(split), dtype=np.int64)
        self.transform = describe_transform(size=size, augment=views > 1)
        if views > 1:
            self.transform += f"; {views} views, seed {seed}"

    def prepare(self) -> None:
        """Decode now if not done yet (before a progress bar of the forward starts)."""
        if self.images is None:
            self._decode()

    def _decode(self) -> None:
        from .data import decode_split

        split = self.split
        with Bar(self.progress and split.paths is not None) as bar:
            cb = None
            if bar is not None:
                task = bar.add_task(f"decode {split.name}", total=len(split), rate="")
                cb = lambda n: bar.update(task, completed=n)  # noqa: E731
            images, kept = decode_split(split, self.size, skip_bad=self.skip_bad,
                                        workers=max(1, self.workers), progress=cb)
        kept = np.asarray(kept, dtype=np.int64)
        if self.images is None and hasattr(self, "kept") and not np.array_equal(kept, self.kept):
            raise LtcliError(f"split {split.name}: images changed while extracting")
        self.kept = kept
        if self.device.type == "cuda":
            images = images.to(self.device) if images.numel() <= (4 << 30) else images.pin_memory()
        self.images = images

    def batches(self, start: int, stop: int, batch_size: int):
        if start < stop:
            self.prepare()
        for s, e in batch_ranges(start, stop, batch_size):
            x = self.images[s:e].to(self.device, non_blocking=True)
            if self.views == 1:
                xs = [normalize_batch(x)]
            else:
                xs = []
                for k in range(self.views):
                    g = torch.Generator(device=self.device)
                    g.manual_seed(mix_seed(self.seed, k, s))
                    xs.append(normalize_batch(augment_batch(x, g)))
            yield s, e, [to_channels_last(v, self.device) for v in xs]


# --- streamed from files -------------------------------------------------------------------------


class _FileDataset(torch.utils.data.Dataset):
    """Loads one image (or its K seeded views, or its raw bytes) per row; never raises."""

    def __init__(self, split, rows: np.ndarray, transform, views: int, seed: int, raw: bool,
                 draft: int | None = None):
        self.split, self.rows, self.transform = split, rows, transform
        self.views, self.seed, self.raw, self.draft = views, seed, raw, draft

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, j: int):
        i = int(self.rows[j])
        try:
            if self.raw:
                with open(self.split.paths[i], "rb") as fh:
                    data = fh.read()
                return torch.frombuffer(bytearray(data), dtype=torch.uint8), j, ""
            img = self.split.load(i, draft=self.draft)
            if self.views == 1:
                return self.transform(img), j, ""
            out = []
            for k in range(self.views):
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(mix_seed(self.seed, k, i))
                    out.append(self.transform(img))
            return torch.stack(out), j, ""
        except LtcliError as exc:
            return torch.zeros(0), j, str(exc)
        except OSError as exc:
            path = self.split.paths[i] if self.split.paths is not None else f"#{i}"
            return torch.zeros(0), j, f"{path}: cannot read image ({exc.strerror or exc})"


def _collate(items):
    """Stack decoded images in the worker (so the pinned batch arrives ready); raw file
    bytes are packed into one tensor plus lengths (one shared-memory transfer per batch)."""
    tensors, js, errs = zip(*items)
    errs = [e for e in errs if e]
    if errs:
        return None, list(js), errs
    if tensors[0].dtype == torch.uint8 and tensors[0].dim() == 1:
        return pack_bytes(tensors), list(js), []
    return torch.stack(tensors), list(js), []


class _BatchGrid(torch.utils.data.Sampler):
    def __init__(self, start: int, stop: int, batch_size: int):
        self.ranges = list(batch_ranges(start, stop, batch_size))

    def __iter__(self):
        for s, e in self.ranges:
            yield list(range(s, e))

    def __len__(self) -> int:
        return len(self.ranges)


class FileSource:
    """A DataLoader over the split's images, in the batches of the global grid; rows are
    positions in `kept`."""

    def __init__(self, split, kept, size, workers, device, views, seed, gpu_decode):
        self.split, self.kept = split, np.asarray(kept, dtype=np.int64)
        self.size = size
        self.workers, self.device, self.views, self.seed = workers, device, views, seed
        self.gpu_decode = bool(gpu_decode and device.type == "cuda" and split.paths is not None and views == 1)
        self.resize = test_resize(self.size)
        if views > 1:
            self.tf = train_transform(self.size)
            self.transform = f"{describe_transform(self.tf)}; {views} views, seed {seed}"
        elif self.gpu_decode:
            self.tf = None
            self.transform = (
                f"gpu-decode {self.size}px: resize {self.resize} (bilinear, antialias) + center crop "
                f"{self.size}, normalize(imagenet mean/std)"
            )
        else:
            self.tf = test_transform(self.size)
            # big JPEGs decode at reduced scale (Split.load's draft), which the cache records
            self.transform = f"{describe_transform(self.tf)}; JPEG draft >= {self.resize}px"

    def prepare(self) -> None:
        """Nothing to do before the first batch (images are decoded as they stream)."""

    def batches(self, start: int, stop: int, batch_size: int):
        draft = self.resize if self.views == 1 and not self.gpu_decode else None
        ds = _FileDataset(self.split, self.kept, self.tf, self.views, self.seed, raw=self.gpu_decode, draft=draft)
        grid = _BatchGrid(start, stop, batch_size)
        loader = torch.utils.data.DataLoader(
            ds, batch_sampler=grid, num_workers=self.workers, collate_fn=_collate,
            pin_memory=self.device.type == "cuda" and not self.gpu_decode,
            prefetch_factor=4 if self.workers > 0 else None, persistent_workers=False,
        )
        decoder = DeviceDecoder(self.device, self.size, self.resize) if self.gpu_decode else None
        for (s, e), (tensors, js, errs) in zip(grid.ranges, loader):
            if errs:
                raise LtcliError(errs[0])
            if decoder is not None:
                rows = [int(self.kept[j]) for j in js]
                fallback = cpu_fallback(lambda i: self.split.load(rows[i]))
                xs = [normalize_batch(decoder(unpack_bytes(*tensors), fallback))]
            else:
                x = tensors.to(self.device, non_blocking=True)
                xs = [x] if self.views == 1 else [x[:, k] for k in range(self.views)]
            yield s, e, [to_channels_last(v, self.device) for v in xs]


class _Probe(torch.utils.data.Dataset):
    """Item i = "" when image i decodes, else its one-line error."""

    def __init__(self, split):
        self.split = split

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        try:
            self.split.load(i)
            return ""
        except LtcliError as exc:
            return str(exc)


def _as_list(batch):
    return batch


def readable(split, workers: int) -> tuple[np.ndarray, list[str]]:
    """(positions of the images that decode, the errors of those that do not), in order."""
    errors = [""] * len(split)
    loader = torch.utils.data.DataLoader(_Probe(split), batch_size=64, num_workers=min(workers, max(0, len(split) // 64)),
                                         collate_fn=_as_list)
    pos = 0
    for messages in loader:
        errors[pos : pos + len(messages)] = messages
        pos += len(messages)
    ok = np.asarray([i for i, e in enumerate(errors) if not e], dtype=np.int64)
    return ok, [e for e in errors if e]


def scan_readable(split, workers: int) -> np.ndarray:
    """Positions of the images that decode (for --skip-bad-images on file-backed data)."""
    return readable(split, workers)[0]

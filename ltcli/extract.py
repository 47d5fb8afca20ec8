"""`ltcli extract`: run a trained backbone once over a split and stream its features into the
HDF5 cache of `ltcli.features`.

Two input paths:
- small images (native side <= 64: CIFAR, synthetic): the split is decoded once into a uint8
  tensor (`decode_split`), kept on the device, normalised there (`normalize_batch`); with
  views > 1 each view is `augment_batch` with a generator seeded by (seed, view, batch start).
- large images: a DataLoader (workers, pinned memory) applying `test_transform` (views > 1:
  `train_transform`, seeded per (seed, view, image)). With `gpu_decode` on CUDA, workers only
  read the file bytes and JPEGs are decoded, resized and cropped on the GPU.

On CUDA the forward runs under bf16 autocast in channels_last, copies are non-blocking into
recycled pinned buffers, and a writer thread waits on a CUDA event before writing, so the GPU
never waits for the disk.

Determinism: batches always follow the grid 0, B, 2B, ... of the batch size the file was
started with (stored in the file), so a resumed run recomputes exactly the batches an
uninterrupted one would, and on CPU ends with the same bytes. Under torch.distributed each rank
takes a contiguous range of whole batches into `<out>.rank<r>-of-<W>.h5`; rank 0 merges the
shards into `out` through the same writer, in the same batches, so the merged file is the file
one process would have written.
"""

from __future__ import annotations

import os
import queue
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from .console import err_console, progress_bar
from .device import amp_dtype
from .device_decode import DeviceDecoder, cpu_fallback, pack_bytes, unpack_bytes
from .errors import LtcliError
from .features import FeatureWriter, _open_h5, check_cache_options, shard_path

SMALL_IMAGE_MAX = 64
TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32}


# --------------------------------------------------------------------------------------------
# helpers


def _mix(*values: int) -> int:
    """A 63-bit seed from several integers (independent streams per (seed, view, row))."""
    return int(np.random.SeedSequence([int(v) & 0xFFFFFFFF for v in values]).generate_state(2, np.uint64)[0] >> 1)


def _dist_info(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return int(rank), int(world_size)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_ok(ok: bool, world_size: int) -> bool:
    """True on every rank iff `ok` on every rank (a barrier that also carries failures)."""
    if world_size == 1:
        return ok
    import torch.distributed as dist

    dev = torch.device("cpu")
    if dist.get_backend() == "nccl":
        dev = torch.device("cuda", torch.cuda.current_device())
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=dev)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def batch_ranges(start: int, stop: int, batch_size: int) -> Iterator[tuple[int, int]]:
    """[s, e) for the batches of the global grid 0, B, 2B, ... that lie in [start, stop)."""
    s = start
    while s < stop:
        e = min(stop, (s // batch_size + 1) * batch_size)
        yield s, e
        s = e


def rank_rows(n: int, batch_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous rows [start, stop) of rank `rank`: whole batches, split evenly."""
    nb = -(-n // batch_size)
    b0, b1 = rank * nb // world_size, (rank + 1) * nb // world_size
    return min(n, b0 * batch_size), min(n, b1 * batch_size)


# --------------------------------------------------------------------------------------------
# sources: give normalised float batches on the device for rows [s, e)


class _SmallSource:
    """The whole split decoded once into a uint8 N x 3 x H x W tensor (on the device on CUDA).

    When the rows and the side are known without decoding (no skip_bad; `size` given or the
    images in memory), decoding waits for the first batch, so a reused file costs nothing."""

    def __init__(self, split, size, skip_bad, workers, device, views, seed, progress=False):
        self.split, self.size, self.skip_bad, self.workers = split, size, skip_bad, workers
        self.device, self.views, self.seed, self.progress = device, views, seed, progress
        self.images = None
        if not skip_bad and (size is not None or split.images is not None):
            self.kept = np.arange(len(split), dtype=np.int64)
            self.side = int(size if size is not None else split.images.shape[2])
        else:
            self._decode()
        from .transforms import describe_transform

        self.transform = describe_transform(size=self.side, augment=views > 1)
        if views > 1:
            self.transform += f"; {views} views, seed {seed}"

    def prepare(self) -> None:
        """Decode now if not done yet (before a progress bar of the forward starts)."""
        if self.images is None:
            self._decode()

    def _decode(self) -> None:
        from .data import decode_split

        split = self.split
        with _Bar(self.progress and split.paths is not None) as bar:
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
        self.side = int(images.shape[-1]) if images.dim() == 4 and len(images) else (self.size or 0)
        if self.device.type == "cuda":
            images = images.to(self.device) if images.numel() <= (4 << 30) else images.pin_memory()
        self.images = images

    def batches(self, start: int, stop: int, batch_size: int):
        from .transforms import augment_batch, normalize_batch

        if start < stop:
            self.prepare()
        cl = self.device.type == "cuda"
        for s, e in batch_ranges(start, stop, batch_size):
            x = self.images[s:e].to(self.device, non_blocking=True)
            if self.views == 1:
                xs = [normalize_batch(x)]
            else:
                xs = []
                for k in range(self.views):
                    g = torch.Generator(device=self.device)
                    g.manual_seed(_mix(self.seed, k, s))
                    xs.append(normalize_batch(augment_batch(x, g)))
            if cl:
                xs = [v.contiguous(memory_format=torch.channels_last) for v in xs]
            yield s, e, xs


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
                path = self.split.paths[i]
                with open(path, "rb") as fh:
                    data = fh.read()
                return torch.frombuffer(bytearray(data), dtype=torch.uint8), j, ""
            img = self.split.load(i, draft=self.draft)
            if self.views == 1:
                return self.transform(img), j, ""
            out = []
            for k in range(self.views):
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(_mix(self.seed, k, i))
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
    def __init__(self, start: int, stop: int, batch_size: int, offset: int):
        self.ranges = list(batch_ranges(start, stop, batch_size))
        self.offset = offset

    def __iter__(self):
        for s, e in self.ranges:
            yield list(range(s - self.offset, e - self.offset))

    def __len__(self) -> int:
        return len(self.ranges)


class _FileSource:
    """A DataLoader over the split's image files, in the batches of the global grid."""

    def __init__(self, split, kept, size, workers, device, views, seed, gpu_decode):
        from .transforms import describe_transform, test_resize, test_transform, train_transform

        self.split, self.kept = split, kept
        self.size = size or 224
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

    def batches(self, start: int, stop: int, batch_size: int):
        from .transforms import normalize_batch

        draft = self.resize if self.views == 1 and not self.gpu_decode else None
        ds = _FileDataset(self.split, self.kept, self.tf, self.views, self.seed, raw=self.gpu_decode, draft=draft)
        # rows of the file are positions in `kept`; the loader indexes ds by file row
        grid = _BatchGrid(start, stop, batch_size, offset=0)
        cuda = self.device.type == "cuda"
        loader = torch.utils.data.DataLoader(
            ds,
            batch_sampler=grid,
            num_workers=self.workers,
            pin_memory=cuda and not self.gpu_decode,
            collate_fn=_collate,
            prefetch_factor=4 if self.workers > 0 else None,
            persistent_workers=False,
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
            if cuda:
                xs = [v.contiguous(memory_format=torch.channels_last) for v in xs]
            yield s, e, xs


def _scan_bad(split, workers: int) -> np.ndarray:
    """Positions of the images that decode (for --skip-bad-images on file-backed data)."""

    class _Probe(torch.utils.data.Dataset):
        def __len__(self):
            return len(split)

        def __getitem__(self, i):
            try:
                split.load(i)
                return True
            except LtcliError:
                return False

    ok = np.ones(len(split), dtype=bool)
    loader = torch.utils.data.DataLoader(
        _Probe(), batch_size=256, num_workers=workers, collate_fn=lambda b: b
    )
    pos = 0
    for flags in loader:
        ok[pos : pos + len(flags)] = flags
        pos += len(flags)
    return np.flatnonzero(ok).astype(np.int64)


# --------------------------------------------------------------------------------------------
# the job


def _host_buffers(shape, dtype, pin: bool, count: int) -> "queue.Queue[torch.Tensor]":
    q: queue.Queue = queue.Queue()
    for _ in range(count):
        buf = torch.empty(shape, dtype=dtype)
        q.put(buf.pin_memory() if pin else buf)
    return q


@torch.inference_mode()
def _run(model, source, writer: FeatureWriter, start: int, stop: int, device, amp, out_dtype, views, bar,
         offset: int = 0) -> None:
    """Forward global rows [start, stop); row r goes to row r - offset of the writer's file."""
    bs = writer.batch_size
    cuda = device.type == "cuda"
    pool = None
    if cuda:
        shape = (bs, writer.dim) if views == 1 else (bs, views, writer.dim)
        pool = _host_buffers(shape, out_dtype, True, writer.queue_size + 2)
    task = bar.add_task(f"extract {writer.path.name}", total=stop - start, rate="") if bar is not None else None
    t0, done = time.perf_counter(), 0
    for s, e, xs in source.batches(start, stop, bs):
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            feats = [model.features(x) for x in xs]
        f = feats[0] if views == 1 else torch.stack(feats, dim=1)
        f = f.to(out_dtype)
        if cuda:
            buf = pool.get()
            host = buf[: e - s]
            host.copy_(f, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record()
            writer.write(s - offset, host, event=ev, release=lambda b=buf: pool.put(b))
        else:
            writer.write(s - offset, f.contiguous())
        done += e - s
        if task is not None:
            rate = done / max(1e-9, time.perf_counter() - t0)
            bar.update(task, advance=e - s, rate=f"{rate:,.0f} img/s")


def _prepare_model(model, device):
    model.eval()
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    for attr in ("features",):
        if not hasattr(model, attr):
            raise LtcliError("checkpoint: the model has no features() method (not an ltcli backbone)")
    fc = getattr(model, "fc", None)
    weight = bias = None
    if isinstance(fc, torch.nn.Linear):
        weight = fc.weight.detach().float().cpu()
        bias = fc.bias.detach().float().cpu() if fc.bias is not None else None
    dim = getattr(model, "feature_dim", None)
    if dim is None and weight is not None:
        dim = int(weight.shape[1])
    if dim is None:
        raise LtcliError("checkpoint: cannot tell the model's feature dimension")
    return int(dim), weight, bias


class _Bar:
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


class Extraction:
    """One extraction job: the model, the split's rows and the provenance of the output.

    `extract_split` is the usual entry point; the pieces are public so that a launcher (or a
    test) can run the shards and the merge of a distributed extraction itself."""

    def __init__(
        self,
        model: torch.nn.Module,
        split,
        out_path: str | os.PathLike,
        *,
        backbone_sha256: str,
        class_names: Sequence[str],
        train_counts: Sequence[int],
        dataset_id: str,
        arch: str | None = None,
        batch_size: int = 256,
        device: str | torch.device = "cpu",
        dtype: str = "float16",
        views: int = 1,
        seed: int = 0,
        size: int | None = None,
        small: bool | None = None,
        workers: int = 0,
        amp: str = "auto",
        gpu_decode: bool = False,
        overwrite: bool = False,
        skip_bad: bool = False,
        progress: bool = True,
    ) -> None:
        self.out = Path(out_path)
        self.device = device = torch.device(device)
        check_cache_options(dtype, views, batch_size)
        if gpu_decode and views > 1:
            raise LtcliError("--gpu-decode: only with --views 1 (augmented views are made on the CPU)")
        if gpu_decode and device.type != "cuda" and progress:
            err_console.print("--gpu-decode needs a CUDA device; decoding on the CPU instead")
        if len(class_names) != len(train_counts):
            raise ValueError("class_names and train_counts differ in length")
        self.amp = amp_dtype(amp, device)
        self.model = model
        self.dim, weight, bias = _prepare_model(model, device)
        if weight is not None and weight.shape[0] != len(class_names):
            raise LtcliError(
                f"checkpoint: the classifier has {weight.shape[0]} classes but the data has {len(class_names)}"
            )
        self.views, self.batch_size, self.overwrite, self.progress = views, batch_size, overwrite, progress
        if small is None:   # as training decides: small images (<= 64 px) go in memory
            small = size <= SMALL_IMAGE_MAX if size else split.images is not None
        if small:
            self.source = _SmallSource(split, size, skip_bad, workers, device, views, seed, progress)
            kept = self.source.kept
        else:
            if skip_bad and split.paths is not None:
                kept = _scan_bad(split, workers)
            else:
                kept = np.arange(len(split), dtype=np.int64)
            self.source = _FileSource(split, kept, size, workers, device, views, seed, gpu_decode)
        self.kept = kept
        self.rows = len(kept)
        self.labels = np.asarray(split.labels, dtype=np.int64)[kept]
        self.attrs = {
            "split": split.name,
            "class_names": list(class_names),
            "train_class_counts": [int(c) for c in train_counts],
            "backbone_sha256": backbone_sha256,
            "data_fingerprint": split.fingerprint(),
            "dataset_id": dataset_id,
            "transform": self.source.transform,
            "views": views,
            "arch": arch or getattr(model, "arch", "") or "",
            "seed": int(seed),
        }
        self.common = dict(dim=self.dim, views=views, dtype=dtype, weight=weight, bias=bias)
        self.out_dtype = TORCH_DTYPES[dtype]

    def _writer(self, path, rows: slice | None = None, extra: dict | None = None, **kw) -> FeatureWriter:
        rows = rows or slice(0, self.rows)
        return FeatureWriter(
            path, rows=rows.stop - rows.start, labels=self.labels[rows], index=self.kept[rows],
            attrs={**self.attrs, **(extra or {})}, batch_size=self.batch_size, overwrite=self.overwrite,
            **self.common, **kw,
        )

    def _forward(self, w: FeatureWriter, start: int, stop: int, offset: int, show: bool) -> None:
        if start < stop and hasattr(self.source, "prepare"):
            self.source.prepare()
        with _Bar(show) as bar:
            _run(self.model, self.source, w, start, stop, self.device, self.amp, self.out_dtype,
                 self.views, bar, offset=offset)

    def run(self) -> Path:
        """Single process: create, resume or reuse `out`."""
        with self._writer(self.out, quiet=not self.progress) as w:
            if w.reused:
                return self.out
            self._forward(w, w.rows_done, self.rows, 0, self.progress)
            return w.finish()

    def final_state(self) -> str:
        """What `run`/`merge` would do with `out` now (reuse, resume, create, replace)."""
        return self._writer(self.out, quiet=True, lock=False).inspect()

    def run_shard(self, rank: int, world_size: int) -> Path:
        """Rank `rank` of `world_size`: its contiguous whole batches into its shard file."""
        start, stop = rank_rows(self.rows, self.batch_size, rank, world_size)
        extra = {"shard_rank": rank, "shard_world": world_size, "row_start": start, "row_stop": stop}
        path = shard_path(self.out, rank, world_size)
        show = self.progress and rank == 0
        with self._writer(path, slice(start, stop), extra, quiet=not show) as w:
            if not w.reused:
                self._forward(w, start + w.rows_done, stop, start, show)
                w.finish()
        return path

    def merge(self, world_size: int) -> Path:
        """Merge the complete shards into `out` and delete them."""
        return merge_shards(
            self.out, world_size, rows=self.rows, labels=self.labels, index=self.kept, attrs=self.attrs,
            batch_size=self.batch_size, overwrite=self.overwrite, quiet=not self.progress, **self.common,
        )


def extract_split(
    model: torch.nn.Module,
    split,
    out_path: str | os.PathLike,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    **options: Any,
) -> Path:
    """Extract `split` through `model.features` into the cache at `out_path`; returns the path.

    Options: backbone_sha256, class_names, train_counts, dataset_id (required), arch,
    batch_size=256, device="cpu", dtype="float16", views=1, seed=0, size=None, small=None,
    workers=0, amp="auto", gpu_decode=False, overwrite=False, skip_bad=False, progress=True
    (see `Extraction`).

    Reuses a complete file with the same provenance (unless `overwrite`), resumes an incomplete
    one, and refuses a different one (naming the field). `small` picks the in-memory path
    (default: the split holds in-memory images); `size` the image side (default: native for
    small images, 224 otherwise). When torch.distributed is initialised with W > 1 ranks the
    split is sharded (every rank must call this) and rank 0 merges; every rank returns the
    path once the merged file is complete."""
    rank, world = _dist_info(rank, world_size)
    job = Extraction(model, split, out_path, **options)
    if world == 1:
        return job.run()
    if job.final_state() == "reuse":
        if rank == 0 and job.progress:
            err_console.print(f"reusing {job.out} (complete, same provenance; --overwrite recomputes)")
        return job.out
    error: BaseException | None = None
    try:
        job.run_shard(rank, world)
    except BaseException as exc:  # noqa: BLE001 - re-raised after telling the other ranks
        error = exc
    if not _all_ok(error is None, world):
        if error is not None:
            raise error
        raise LtcliError(f"{job.out}: extraction failed on another rank (see its message)")
    if rank == 0:
        try:
            job.merge(world)
        except BaseException as exc:  # noqa: BLE001
            error = exc
    if not _all_ok(error is None, world):
        if error is not None:
            raise error
        raise LtcliError(f"{job.out}: merging the shards failed on rank 0 (see its message)")
    return job.out


def merge_shards(out: str | os.PathLike, world_size: int, *, rows: int, labels, index, attrs: dict,
                 batch_size: int, dim: int, views: int = 1, dtype: str = "float16",
                 weight=None, bias=None, overwrite: bool = False, quiet: bool = False) -> Path:
    """Merge `<out>.rank<r>-of-<W>.h5` (complete, contiguous row ranges) into `out`, in the
    batches a single process would have written, then delete the shards."""
    out = Path(out)
    shards = [shard_path(out, r, world_size) for r in range(world_size)]
    ranges = []
    handles = []
    try:
        for p in shards:
            f = _open_h5(p)
            handles.append(f)
            a = f.attrs
            if not bool(a.get("complete", False)):
                raise LtcliError(f"{p}: shard is incomplete; rerun the extraction to finish it")
            ranges.append((int(a["row_start"]), int(a["row_stop"]), f["features"]))
        covered = 0
        for s, e, _ in ranges:
            if s != covered:
                raise LtcliError(f"{out}: shards do not cover rows {covered}..{s}")
            covered = e
        if covered != rows:
            raise LtcliError(f"{out}: shards cover {covered} rows, expected {rows}")
        with FeatureWriter(out, rows=rows, labels=labels, index=index, attrs=attrs, dim=dim, views=views,
                           dtype=dtype, weight=weight, bias=bias, batch_size=batch_size,
                           overwrite=overwrite, quiet=quiet) as w:
            if not w.reused:
                for s, e in batch_ranges(w.rows_done, rows, w.batch_size):
                    parts = []
                    for rs, re_, ds in ranges:
                        lo, hi = max(s, rs), min(e, re_)
                        if lo < hi:
                            parts.append(ds[lo - rs : hi - rs])
                    w.write(s, parts[0] if len(parts) == 1 else np.concatenate(parts))
                w.finish()
    except OSError as exc:
        raise LtcliError(f"{out}: cannot merge shards ({exc})") from None
    finally:
        for f in handles:
            f.close()
    for p in shards:
        p.unlink(missing_ok=True)
        Path(str(p) + ".lock").unlink(missing_ok=True)
    return out

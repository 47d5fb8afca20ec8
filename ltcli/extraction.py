"""The extraction engine behind `ltcli extract`: a backbone's features for one split, streamed
into the HDF5 cache (`ltcli.cache`). The images reach the backbone through the shared input
pipeline (`ltcli.inputs`), as in train-backbone's val pass and predict.

On CUDA copies are non-blocking into recycled pinned buffers, and the writer thread waits on
a CUDA event before writing, so the GPU never waits for the disk.

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
from typing import Any, Sequence

import numpy as np
import torch

from .cache import FeatureWriter, check_cache_options, open_h5, shard_path
from .console import err_console
from .errors import LtcliError
from .inputs import (Bar, batch_ranges, forward_features, input_size, open_source, prepare_model,
                     probe_native_size)
from .runtime import amp_dtype

TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32}


# --------------------------------------------------------------------------------------------
# helpers


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


def rank_rows(n: int, batch_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous rows [start, stop) of rank `rank`: whole batches, split evenly."""
    nb = -(-n // batch_size)
    b0, b1 = rank * nb // world_size, (rank + 1) * nb // world_size
    return min(n, b0 * batch_size), min(n, b1 * batch_size)


# --------------------------------------------------------------------------------------------
# the job


def _host_buffers(shape, dtype, pin: bool, count: int) -> "queue.Queue[torch.Tensor]":
    q: queue.Queue = queue.Queue()
    for _ in range(count):
        buf = torch.empty(shape, dtype=dtype)
        q.put(buf.pin_memory() if pin else buf)
    return q


def _run(model, source, writer: FeatureWriter, start: int, stop: int, device, amp, out_dtype, bar,
         offset: int = 0) -> None:
    """Forward global rows [start, stop); row r goes to row r - offset of the writer's file."""
    bs = writer.batch_size
    cuda = device.type == "cuda"
    pool = None
    if cuda:
        pool = _host_buffers((bs, *writer.shape[1:]), out_dtype, True, writer.queue_size + 2)
    task = bar.add_task(f"extract {writer.path.name}", total=stop - start, rate="") if bar is not None else None
    t0, done = time.perf_counter(), 0
    for s, e, xs in source.batches(start, stop, bs):
        f = forward_features(model, xs, device, amp).to(out_dtype)
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


def stage1_classifier(model) -> tuple[int, torch.Tensor | None, torch.Tensor | None]:
    """(feature dim D, stage-1 weight C x D or None, bias C or None) of a backbone: a model
    that ltcli did not train has no stage-1 classifier."""
    if not hasattr(model, "features"):
        raise LtcliError("checkpoint: the model has no features() method (not an ltcli backbone)")
    fc = getattr(model, "fc", None)
    weight = bias = None
    if isinstance(fc, torch.nn.Linear) and getattr(model, "has_classifier", True):
        weight = fc.weight.detach().float().cpu()
        bias = fc.bias.detach().float().cpu() if fc.bias is not None else None
    dim = getattr(model, "feature_dim", None)
    if dim is None and weight is not None:
        dim = int(weight.shape[1])
    if dim is None:
        raise LtcliError("checkpoint: cannot tell the model's feature dimension")
    return int(dim), weight, bias


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
        in_memory: bool | None = None,
        workers: int = 0,
        amp: str = "auto",
        gpu_decode: bool = False,
        overwrite: bool = False,
        skip_bad: bool = False,
        progress: bool = True,
        stage1: str = "trained",
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
        self.dim, weight, bias = stage1_classifier(model)
        prepare_model(model, device)
        if weight is not None and weight.shape[0] != len(class_names):
            raise LtcliError(
                f"checkpoint: the classifier has {weight.shape[0]} classes but the data has {len(class_names)}"
            )
        self.views, self.batch_size, self.overwrite, self.progress = views, batch_size, overwrite, progress
        if size is None or in_memory is None:  # as training decides
            size, in_memory = input_size(probe_native_size(split), size)
        self.source = open_source(split, size=size, in_memory=in_memory, device=device, views=views, seed=seed,
                                  workers=workers, skip_bad=skip_bad, gpu_decode=gpu_decode, progress=progress)
        kept = self.source.kept
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
            "stage1": stage1 if weight is not None else "none",
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
        with Bar(show) as bar:
            _run(self.model, self.source, w, start, stop, self.device, self.amp, self.out_dtype, bar, offset=offset)

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
    batch_size=256, device="cpu", dtype="float16", views=1, seed=0, size=None, in_memory=None,
    workers=0, amp="auto", gpu_decode=False, overwrite=False, skip_bad=False, progress=True
    (see `Extraction`).

    Reuses a complete file with the same provenance (unless `overwrite`), resumes an incomplete
    one, and refuses a different one (naming the field). `size` / `in_memory` default to what
    `ltcli.inputs.input_size` decides for the split's images. When torch.distributed is initialised with W > 1 ranks the
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
            f = open_h5(p)
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

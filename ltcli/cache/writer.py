"""Writing the feature cache: create, resume or reuse one file, rows streamed from a thread.

Crash safety and bit-identical resume: the file is created complete in shape (every dataset
allocated, labels/index/classifier written, every attribute present with `rows_done=0`,
`complete=False`) under a temporary name and renamed into place. After that the only changes
are in-place writes of feature rows and in-place updates of `rows_done` (after the rows are
flushed) and finally of `complete` (after everything else is flushed). No timestamps are
stored. So a run killed at any point and resumed from `rows_done` ends with exactly the bytes
of an uninterrupted run.
"""

from __future__ import annotations

import errno
import os
import queue
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ..console import err_console
from ..errors import JobFailed, LtcliError
from ..io import exclusive_lock, fsync_dir, fsync_file
from .compat import check_cache_options
from .schema import (CACHE_BYTES, CHAIN_START, DTYPES, IDENTITY, WRITER_KEPT, chain_step, first_line,
                     grid, h5_reason, is_enospc, is_true, job_attrs, open_h5, plain, short)


def _is_hdf5(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(8) == b"\x89HDF\r\n\x1a\n"
    except OSError:
        return False


def _bounded_int(value, high: int, name: str, path: Path, low: int = 0) -> int:
    value = plain(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} = {value!r} is not an integer in {low}..{high}")
    return value


def _write_error(path: Path, exc: BaseException, rows_done: int, rows: int) -> Exception:
    if is_enospc(exc):
        return JobFailed(
            f"{path}: no space left on device after {rows_done} of {rows} rows; the file is kept "
            "incomplete: free some space and rerun `ltcli extract` to resume"
        )
    if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return LtcliError(f"{path}: not writable ({exc.strerror})")
    return LtcliError(f"{path}: cannot write features ({first_line(exc)})")


class FeatureWriter:
    """Create, resume or reuse a features file and stream rows into it from a thread.

    Use as a context manager::

        with FeatureWriter(path, rows=N, dim=D, labels=..., index=..., attrs={...}) as w:
            if not w.reused:
                for start in range(w.rows_done, N, w.batch_size):
                    w.write(start, block)            # numpy / CPU tensor, rows start..start+len
                w.finish()

    On entering, the writer takes `exclusive_lock(path)` (a second writer is refused), then:
    no file -> creates it; a complete file with the same provenance -> `reused` (nothing is
    written, unless overwrite); an incomplete file with the same provenance -> resumes at
    `rows_done` with the batch size it was started with; any other file -> LtcliError naming
    the first differing field (or, with overwrite=True, deletes it and starts afresh).
    Rows must arrive in order, one batch (`batch_size` rows, less for the last) per call, so a
    resumed run repeats the uninterrupted run's batches exactly."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        rows: int,
        dim: int,
        labels: Sequence[int] | np.ndarray,
        index: Sequence[int] | np.ndarray,
        attrs: Mapping[str, Any],
        views: int = 1,
        dtype: str = "float16",
        weight: torch.Tensor | np.ndarray | None = None,
        bias: torch.Tensor | np.ndarray | None = None,
        batch_size: int = 256,
        overwrite: bool = False,
        queue_size: int = 4,
        quiet: bool = False,
        lock: bool = True,
    ) -> None:
        check_cache_options(dtype, views, batch_size)
        self.path = Path(path)
        self.rows = int(rows)
        self.dim = int(dim)
        self.views = int(views)
        self.dtype = dtype
        self.np_dtype = np.dtype(DTYPES[dtype])
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        self.index = np.asarray(index, dtype=np.int64).reshape(-1)
        if len(self.labels) != self.rows or len(self.index) != self.rows:
            raise ValueError("labels and index need one entry per row")
        self.weight = None if weight is None else np.asarray(torch.as_tensor(weight).detach().float().cpu())
        self.bias = None if bias is None else np.asarray(torch.as_tensor(bias).detach().float().cpu())
        self.attrs = job_attrs({**attrs, "views": self.views})
        self.batch_size = int(batch_size)
        self.overwrite = overwrite
        self.queue_size = max(1, int(queue_size))
        self.quiet = quiet
        self.use_lock = lock
        self.reused = False
        self.resumed = False
        self.rows_done = 0
        self.shape = (self.rows, self.dim) if self.views == 1 else (self.rows, self.views, self.dim)
        self._lock_cm = None
        self._file = None
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._error: BaseException | None = None
        self._next = 0
        self._written = 0
        self._finished = False
        self.target: Path | None = None  # set while an --overwrite builds its replacement
        self._chain = CHAIN_START
        self._slow = float(os.environ.get("LTCLI_TEST_SLOW_CHUNK", "0") or 0)

    # ---- opening -----------------------------------------------------------------------
    def __enter__(self) -> "FeatureWriter":
        if self.use_lock:
            self._lock_cm = exclusive_lock(self.path)
            self._lock_cm.__enter__()
        try:
            self._open()
        except BaseException:
            self._release()
            raise
        return self

    def _release(self) -> None:
        if self._lock_cm is not None:
            cm, self._lock_cm = self._lock_cm, None
            cm.__exit__(None, None, None)

    def _mismatch(self, f) -> tuple[str, Any, Any] | None:
        """The first provenance field where the existing file differs from this job."""
        have = {k: plain(v) for k, v in f.attrs.items()}
        want = {k: plain(v) for k, v in self.attrs.items()}
        for key in IDENTITY:
            if key == "seed" and self.views == 1:
                continue   # the test-time transform does not use the seed
            if key in want or key in have:
                if want.get(key) != have.get(key):
                    return key, have.get(key), want.get(key)
        feats = f.get("features")
        if feats is None or not hasattr(feats, "shape"):
            return "features", None, "present"
        if tuple(feats.shape) != self.shape:
            return "shape", tuple(feats.shape), self.shape
        if np.dtype(feats.dtype) != self.np_dtype:
            return "dtype", str(np.dtype(feats.dtype)), self.dtype
        for name, want_arr in (("labels", self.labels), ("index", self.index)):
            ds = f.get(name)
            if ds is None or ds.shape != want_arr.shape or not np.array_equal(ds[()], want_arr):
                return name, "(different)", "(this data)"
        return None

    def inspect(self) -> str:
        """What entering would do with the existing file, without changing anything:
        "create" (no file), "reuse", "resume" or "replace" (overwrite); LtcliError when a
        different or unreadable file is in the way and overwrite is off."""
        path = self.path
        if not path.exists() and not path.is_symlink():
            return "create"
        if path.is_dir():
            raise LtcliError(f"{path}: is a directory, expected a features .h5 file")
        if not _is_hdf5(path):  # a checkpoint, a head, any other file: never replaced
            raise LtcliError(f"{path}: exists and is not a features file (no HDF5 signature); refusing to "
                             "replace it (choose another --out)")
        try:
            f = open_h5(path, "r")
        except LtcliError as exc:
            if not self.overwrite:
                raise LtcliError(f"{exc}; pass --overwrite to replace it") from None
            return "replace"
        try:
            complete = is_true(f.attrs.get("complete", False))
            diff = self._mismatch(f) if "rows_done" in f.attrs else ("rows_done", None, "present")
            file_rows = int(f["features"].shape[0]) if "features" in f and f["features"].ndim else 0
            self._found_rows = _bounded_int(f.attrs.get("rows_done", 0), file_rows, "rows_done", path)
            self._found_batch = _bounded_int(f.attrs.get("batch_size", self.batch_size), 1 << 30, "batch_size", path,
                                             low=1)
            self._found_chain = plain(f.attrs.get("rows_sha256", ""))
        except (OSError, KeyError, ValueError, TypeError) as exc:
            diff = ("attributes", f"unreadable ({first_line(exc, 60)})", "readable")
            complete = False
        finally:
            f.close()
        if self.overwrite:
            return "replace"
        if diff is None and complete:  # complete is only believed if the rows bear it out
            if self._found_rows != self.rows:
                diff = ("rows_done", self._found_rows, self.rows)
            else:
                self._verified_chain(self.rows, self._found_chain)
        if diff is not None:
            key, old, new = diff
            state = "complete" if complete else "incomplete"
            raise LtcliError(
                f"{path}: an existing {state} features file was made with a different {key} "
                f"({short(old)} in the file vs {short(new)} now); pass --overwrite to replace it"
            )
        return "reuse" if complete else "resume"

    def _open(self) -> None:
        path = self.path
        state = self.inspect()
        if state == "reuse":
            self.reused = True
            self.rows_done = self.rows
            if not self.quiet:
                err_console.print(f"reusing {path} (complete, same provenance; --overwrite recomputes)")
            return
        if state == "resume":
            self.resumed = True
            self.batch_size = self._found_batch
            self.rows_done = self._found_rows
            self._chain = self._verified_chain(self._found_rows, self._found_chain)
            self._open_for_writing()
            if not self.quiet and self.rows_done:
                err_console.print(f"resuming {path} at row {self.rows_done} of {self.rows}")
            return
        if state == "replace":
            # the new file is built beside the old one and renamed over it when complete: a
            # crash leaves the old file intact (and the new one resumable by the same command)
            self.target, self.path = path, path.with_name(f".{path.name}.replacing.h5")
            self.overwrite = False
            try:
                pending = self.inspect()
            except LtcliError:  # a leftover of another job: start afresh
                self.path.unlink(missing_ok=True)
                pending = "create"
            if pending == "reuse":  # finished but not yet renamed when the last run stopped
                os.replace(self.path, self.target)
                fsync_dir(self.target.parent)
                self.path, self.reused, self.rows_done = self.target, True, self.rows
                return
            if pending == "resume":
                self._open()
                return
        self._create()
        self._open_for_writing()

    def _row_bytes(self) -> int:
        return self.views * self.dim * self.np_dtype.itemsize

    def _check_space(self, rows_left: int) -> None:
        need = rows_left * self._row_bytes()
        try:
            free = shutil.disk_usage(self.path.parent).free
        except OSError:
            return
        if need > free:
            raise JobFailed(
                f"{self.path}: not enough disk space ({need / 1e9:.2f} GB needed for "
                f"{rows_left} rows, {free / 1e9:.2f} GB free)"
            )

    def _create(self) -> None:
        import h5py
        path = self.path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _write_error(path, exc, 0, self.rows) from None
        self._check_space(self.rows)
        tmp = path.with_name(f".{path.name}.creating")
        try:
            tmp.unlink(missing_ok=True)
            with h5py.File(tmp, "w", locking="best-effort") as f:
                dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
                # one contiguous block, allocated now: rows are written in place, and readers
                # memory-map it whatever its size (chunked data would have B-tree nodes among it)
                dcpl.set_layout(h5py.h5d.CONTIGUOUS)
                dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)   # whole layout fixed now
                dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)     # no zero-fill pass
                dcpl.set_obj_track_times(False)                  # no timestamps
                f.create_dataset("features", shape=self.shape, dtype=self.np_dtype, dcpl=dcpl)
                f.create_dataset("labels", data=self.labels, track_times=False)
                f.create_dataset("index", data=self.index, track_times=False)
                if self.weight is not None or self.bias is not None:
                    g = f.create_group("classifier")
                    if self.weight is not None:
                        g.create_dataset("weight", data=self.weight.astype(np.float32), track_times=False)
                    if self.bias is not None:
                        g.create_dataset("bias", data=self.bias.astype(np.float32), track_times=False)
                for key, value in self.attrs.items():
                    if key in WRITER_KEPT and key != "format":
                        continue
                    if key == "train_class_counts":
                        value = np.asarray(value, dtype=np.int64)
                    elif value is None:
                        value = ""
                    f.attrs[key] = value
                f.attrs["batch_size"] = np.int64(self.batch_size)
                f.attrs["rows_done"] = np.int64(0)
                f.attrs["rows_sha256"] = CHAIN_START
                f.attrs["complete"] = np.bool_(False)
            fsync_file(tmp)
            os.replace(tmp, path)
            fsync_dir(path.parent)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise _write_error(path, exc, 0, self.rows) from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self.rows_done = 0
        self._chain = CHAIN_START

    def _verified_chain(self, rows_done: int, stored: str) -> str:
        """The checksum chain of rows [0, rows_done), recomputed from the file and compared with
        the one stored beside rows_done: a resume trusts the rows, not the counter."""
        chain = CHAIN_START
        if rows_done:
            with open_h5(self.path, "r") as f:
                dset = f["features"]
                for s, e in grid(0, rows_done, self._found_batch):
                    chain = chain_step(chain, np.asarray(dset[s:e]))
        if chain != stored:
            raise LtcliError(f"{self.path}: rows_done says {rows_done} rows were written, but they do not match "
                             "the file's checksum; pass --overwrite to recompute it")
        return chain

    def _open_for_writing(self) -> None:
        import h5py
        if self.rows_done < self.rows:
            self._check_space(self.rows - self.rows_done)
        try:
            self._file = h5py.File(self.path, "r+", locking="best-effort", rdcc_nbytes=CACHE_BYTES)
            self._dset = self._file["features"]
        except OSError as exc:
            raise LtcliError(
                f"{self.path}: cannot open for writing ({h5_reason(exc)}); pass --overwrite "
                "to replace it"
            ) from None
        self._next = self.rows_done
        self._written = self.rows_done
        self._queue = queue.Queue(maxsize=self.queue_size)
        self._thread = threading.Thread(target=self._run, name="ltcli-feature-writer", daemon=True)
        self._thread.start()

    # ---- the writer thread -------------------------------------------------------------
    def _run(self) -> None:
        assert self._queue is not None
        while True:
            item = self._queue.get()
            if item is None:
                return
            start, block, event, release = item
            try:
                if self._error is None:
                    if event is not None:
                        event.synchronize()
                    arr = block.numpy() if isinstance(block, torch.Tensor) else np.asarray(block)
                    self._write_rows(start, arr)
            except BaseException as exc:  # noqa: BLE001 - handed to the producer
                self._error = exc
            finally:
                if release is not None:
                    release()

    def _write_rows(self, start: int, arr: np.ndarray) -> None:
        n = arr.shape[0]
        if arr.dtype != self.np_dtype:
            with np.errstate(over="ignore", invalid="ignore"):
                arr = arr.astype(self.np_dtype)
        if not np.isfinite(arr).all():
            bad = int(start + np.flatnonzero(~np.isfinite(arr.reshape(n, -1)).all(axis=1))[0])
            hint = " (values beyond the float16 range: use --dtype float32)" if self.dtype == "float16" else ""
            raise LtcliError(f"{self.path}: row {bad} has non-finite features{hint}")
        try:
            self._dset[start : start + n] = arr
            self._file.flush()
            self._fsync()  # the rows reach the disk before the counter that vouches for them
            self._chain = chain_step(self._chain, arr)
            self._file.attrs.modify("rows_sha256", self._chain)
            self._file.attrs.modify("rows_done", np.int64(start + n))
            self._file.flush()
        except OSError as exc:
            raise _write_error(self.path, exc, self._written, self.rows) from None
        self._written = start + n
        if self._slow:
            err_console.file.write(f"ltcli-test: rows_done={self._written}\n")
            err_console.file.flush()
            time.sleep(self._slow)

    # ---- producer side -----------------------------------------------------------------
    def _raise_pending(self) -> None:
        if self._error is not None:
            err = self._error
            if isinstance(err, (LtcliError, JobFailed)):
                raise err
            raise _write_error(self.path, err, self._written, self.rows)

    def write(
        self,
        start: int,
        block: np.ndarray | torch.Tensor,
        *,
        event: Any = None,
        release: Callable[[], None] | None = None,
    ) -> None:
        """Queue rows start..start+len(block) (in the stored layout, N x D or N x K x D).

        `event` (a torch.cuda.Event) is waited on before `block` is read, so a non-blocking
        device-to-host copy can be handed over without a sync; `release()` is called once the
        block has been written (to recycle a pinned buffer)."""
        if self.reused or self._queue is None:
            raise RuntimeError("FeatureWriter.write on a file that is not open for writing")
        if start != self._next:
            raise RuntimeError(f"rows out of order: got {start}, expected {self._next}")
        n = int(block.shape[0])
        if tuple(block.shape[1:]) != self.shape[1:]:
            raise RuntimeError(f"block of shape {tuple(block.shape)} does not fit {self.shape}")
        if start + n > self.rows:
            raise RuntimeError("more rows than the file holds")
        self._next = start + n
        item = (start, block, event, release)
        while True:
            self._raise_pending()
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                if self._thread is None or not self._thread.is_alive():
                    self._raise_pending()
                    raise RuntimeError("feature writer thread stopped")

    def _drain(self) -> None:
        if self._thread is not None and self._queue is not None:
            while self._thread.is_alive():
                try:
                    self._queue.put(None, timeout=0.1)
                    break
                except queue.Full:
                    continue
            self._thread.join()
        self._thread = None

    def _close_file(self) -> None:
        if self._file is not None:
            f, self._file = self._file, None
            try:
                f.close()
            except Exception:  # noqa: BLE001 - a failed close after an error changes nothing
                pass

    def finish(self) -> Path:
        """Wait for every queued row, then mark the file complete (the last write)."""
        if self.reused:
            return self.path
        self._drain()
        self._raise_pending()
        if self._written != self.rows:
            raise RuntimeError(f"finish() after {self._written} of {self.rows} rows")
        try:
            self._file.flush()
            self._fsync()
            self._file.attrs.modify("complete", np.bool_(True))
            self._file.flush()
            self._fsync()
            f, self._file = self._file, None
            f.close()
            if self.target is not None:  # --overwrite: the new file takes the old one's place
                os.replace(self.path, self.target)
                fsync_dir(self.target.parent)
                self.path = self.target
        except OSError as exc:
            raise _write_error(self.path, exc, self._written, self.rows) from None
        self._finished = True
        return self.path

    def _fsync(self) -> None:
        try:
            os.fsync(self._file.id.get_vfd_handle())
        except (AttributeError, OSError, TypeError, ValueError):  # a driver without a file descriptor
            pass

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._drain()
            self._close_file()
        finally:
            self._release()
        if exc_type is None and not self._finished and not self.reused:
            # left without finish(): the file stays incomplete and resumable
            pass


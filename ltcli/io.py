"""Crash-safe file writing, safe checkpoint loading and single-writer locks.

Every file ltcli produces is written to a temporary name in the same folder and
renamed into place, so a killed process or a full disk never leaves a
half-written file where a finished one is expected."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import pickle
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .errors import LtcliError


def _disk_error(path: Path, exc: OSError) -> LtcliError:
    if exc.errno == errno.ENOSPC:
        return LtcliError(f"{path}: no space left on device (nothing was overwritten)")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return LtcliError(f"{path}: not writable ({exc.strerror})")
    return LtcliError(f"{path}: cannot write ({exc.strerror or exc})")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync and rename it into place.

    On any error the temporary file is removed and `path` is left untouched."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise _disk_error(path, exc) from None
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        _test_pause(path)
        os.replace(tmp_path, path)
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        raise _disk_error(path, exc) from None
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _test_pause(path: Path) -> None:
    """Test hook: LTCLI_TEST_SLOW_WRITE=SECONDS holds a finished temporary file back from its
    rename (announced as `ltcli-test: renaming PATH` on stderr), for kill -9 tests."""
    delay = os.environ.get("LTCLI_TEST_SLOW_WRITE")
    if delay:
        import sys
        import time

        sys.stderr.write(f"ltcli-test: renaming {path}\n")
        sys.stderr.flush()
        time.sleep(float(delay))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        # through a Python file object: a failed write (ENOSPC, EIO, ...) then raises OSError
        # with its errno; torch.save(obj, path) reports it as an opaque RuntimeError instead
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line (e.g. a metrics.jsonl record) and flush it to disk."""
    path = Path(path)
    try:
        with open(path, "a") as fh:
            fh.write(line.rstrip("\n") + "\n")
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise _disk_error(path, exc) from None


def safe_torch_load(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """torch.load with weights_only=True; every failure becomes a one-line LtcliError.

    A file carrying pickled objects (which could run code) is refused, not loaded."""
    path = Path(path)
    if not path.exists():
        raise LtcliError(f"{path}: {what} not found")
    if path.is_dir():
        raise LtcliError(f"{path}: is a directory, expected a {what} file")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says it
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        first = text.strip().splitlines()[0] if text.strip() else "UnpicklingError"
        if "unsupported global" in text.lower():  # the file names Python callables/classes
            raise LtcliError(
                f"{path}: refused to load {what}: it contains pickled Python objects "
                "that could run code (only tensors and plain values are accepted)"
            ) from None
        if "weights_only" in text or "Weights only" in text:  # opcodes the safe unpickler refuses
            m = re.search(r"Unsupported operand \d+", text)
            raise LtcliError(
                f"{path}: not a valid {what} (corrupt, truncated or not written by torch.save"
                f"{': ' + m.group(0) if m else ''}); it was not loaded"
            ) from None
        raise LtcliError(f"{path}: not a valid {what} ({first[:120]})") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, AttributeError, IndexError,
            TypeError, MemoryError, OverflowError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if len(first) < 12:  # e.g. a bare KeyError(157) from garbage bytes: say what it was
            first = f"{type(exc).__name__}{': ' + first if first else ''}"
        raise LtcliError(f"{path}: not a valid {what} (corrupt or truncated: {first[:120]})") from None


@contextlib.contextmanager
def exclusive_lock(target: str | os.PathLike, wait: bool = False) -> Iterator[None]:
    """Hold an advisory lock on `<target>.lock` so two writers never interleave.

    With wait=False a second writer is refused with a clear message."""
    lock_path = Path(str(target) + ".lock")
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(lock_path, "a+")
    except OSError as exc:
        raise _disk_error(lock_path, exc) from None
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise LtcliError(
                f"{target}: another ltcli process is writing this file (lock {lock_path}); "
                "wait for it to finish"
            ) from None
        yield
    finally:
        fh.close()


def read_path_arg(value: str, what: str, stdin_reader: Callable[[], str] | None = None) -> str:
    """Resolve an input path argument; '-' reads the first non-empty line of stdin."""
    if value != "-":
        return value
    import sys

    text = stdin_reader() if stdin_reader else sys.stdin.read()
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    raise LtcliError(f"{what}: '-' given but stdin held no path")

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

from .errors import JobFailed, LtcliError


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _current_umask()  # read once, at import (os.umask can only be read by setting it)


def check_regular_file(path: str | os.PathLike, what: str) -> Path:
    """The path of an existing regular file, checked before anything opens it: a FIFO or a
    device named like a data file would block or stream forever."""
    import stat

    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise LtcliError(f"{path}: {what} not found") from None
    except OSError as exc:
        raise LtcliError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
    noun = what if what.endswith("file") else f"{what} file"
    if stat.S_ISDIR(st.st_mode):
        raise LtcliError(f"{path}: is a directory, expected a {noun}")
    if not stat.S_ISREG(st.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else ("a socket" if stat.S_ISSOCK(st.st_mode) else "a device")
        raise LtcliError(f"{path}: is {kind}, not a regular file; expected a {noun}")
    return path


def _disk_error(path: Path, exc: OSError) -> Exception:
    """A failed write as one line: a full disk or an I/O error is the job failing (exit 1),
    an unwritable path is bad input (exit 2)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return JobFailed(f"{path}: no space left on device (nothing was overwritten)")
    if exc.errno == errno.EIO:
        return JobFailed(f"{path}: input/output error while writing (nothing was overwritten)")
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
        os.chmod(tmp_path, 0o666 & ~UMASK)  # mkstemp makes 0600: give the user's usual permissions
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        _test_pause(path)
        os.replace(tmp_path, path)
        fsync_dir(path.parent)
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        raise _disk_error(path, exc) from None
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename in `folder` durable (the directory entry, not only the file's bytes)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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


class _WriteRecorder:
    """A binary file whose first failed write is remembered: torch's serializer turns an
    OSError raised mid-archive into an opaque RuntimeError, and the errno is what we report."""

    def __init__(self, fh):
        self.fh, self.error = fh, None

    def write(self, data) -> int:
        try:
            return self.fh.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self.fh.flush()


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            out = _WriteRecorder(fh)
            try:
                torch.save(obj, out)
            except RuntimeError:
                if out.error is not None:
                    raise out.error from None  # atomic_path turns it into one line
                raise


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
    path = check_regular_file(path, what)
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


def stdin_lines(max_len: int = 4096) -> Iterator[str]:
    """Non-empty lines of stdin, stripped, read lazily (a pipe that never ends costs no memory);
    a line longer than `max_len` characters is refused, naming its number."""
    import sys

    for number, line in enumerate(iter(lambda: sys.stdin.readline(max_len + 2), ""), start=1):
        if len(line.rstrip("\n")) > max_len:
            raise LtcliError(f"-: stdin line {number} is longer than {max_len} characters")
        if line.strip():
            yield line.strip()


def read_path_arg(value: str, what: str, stdin_reader: Callable[[], str] | None = None) -> str:
    """Resolve an input path argument; '-' reads exactly one path from stdin (a second one is an
    error naming the count: this option takes one file)."""
    if value != "-":
        return value
    if stdin_reader is not None:
        lines = [line.strip() for line in stdin_reader().splitlines() if line.strip()]
    else:
        lines = []
        for line in stdin_lines():
            lines.append(line)
            if len(lines) > 1:
                break
    if not lines:
        raise LtcliError(f"{what}: '-' given but stdin held no path")
    if len(lines) > 1:
        more = len(lines) if stdin_reader is not None else "2 or more"
        raise LtcliError(f"{what}: '-' takes one path, but stdin held {more} (pipe one file, e.g. "
                         "`extract --split train | fit-head --features -`)")
    return lines[0]

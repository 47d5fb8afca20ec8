"""Helpers for the fault tests: start the real CLI, wait for a line on its stderr, kill -9 it."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import torch

from conftest import LTCLI, cli_env


class Job:
    """`python -m ltcli ARGS` in the background; stderr is read line by line on a thread."""

    def __init__(self, *args, **env):
        self.proc = subprocess.Popen(LTCLI + [str(a) for a in args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=cli_env(**env),
                                     start_new_session=True)
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 240) -> re.Match:
        """Block until `count` stderr lines match `pattern` (re.search); fail if the job ends first."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = found = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    m = rx.search(line)
                    if m:
                        found += 1
                        if found == count:
                            return m
                seen = len(self.lines)
                if self.proc.poll() is not None and not self._reader.is_alive():
                    raise AssertionError(f"job ended (exit {self.proc.returncode}) before {pattern!r}:\n"
                                         + "\n".join(self.lines[-30:]))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out waiting for {pattern!r}:\n" + "\n".join(self.lines[-30:]))
                self._cond.wait(min(left, 0.5))

    def kill(self) -> None:
        """SIGKILL, as the OOM killer or a power cut would: no handler, no cleanup runs."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=60)
        assert self.proc.returncode == -signal.SIGKILL

    def finish(self, timeout: float = 300) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines)


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def assert_same_weights(a: Path, b: Path) -> None:
    """Two backbone checkpoints hold exactly the same model tensors."""
    ma = torch.load(a, weights_only=True)["model"]
    mb = torch.load(b, weights_only=True)["model"]
    assert ma.keys() == mb.keys()
    for k in ma:
        assert torch.equal(ma[k], mb[k]), f"{k} differs between {a} and {b}"


def temp_files(folder: Path) -> list[Path]:
    """The hidden temporary files atomic writes leave behind when killed."""
    return sorted(p for p in Path(folder).rglob(".*.tmp"))


def _record(rel: Path) -> bool:
    """The run's records (log.txt, metrics.*, TensorBoard events): a failed job may append to
    them (its error line, an epoch trained before a save failed), never rewrite them."""
    return rel.name in ("log.txt", "metrics.jsonl", "metrics.csv") or rel.parts[0] == "tensorboard"


def run_files(run: Path) -> dict[str, str]:
    """sha256 of every file of a run directory but its records (see `logs_grew`) and lock files
    (taking a lock creates one)."""
    return {str(p.relative_to(run)): sha256(p) for p in sorted(Path(run).rglob("*"))
            if p.is_file() and p.suffix != ".lock" and not _record(p.relative_to(run))}


def run_logs(run: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in Path(run).rglob("*") if p.is_file() and _record(p.relative_to(run))}


def logs_grew(run: Path, before: dict[Path, bytes]) -> bool:
    """The records kept every byte they had: a failure may only append."""
    return all(p.read_bytes().startswith(old) for p, old in before.items())

"""Where a run's records go besides metrics.jsonl: a long-format CSV (metrics.csv: time, event,
epoch, name, value; one row per number, so `pandas.read_csv(...).pivot_table(...)` gives any
table), TensorBoard event files under RUN/tensorboard when tensorboard is installed (the
`tensorboard` extra), and log.txt, the text every command printed on stderr."""

from __future__ import annotations

import csv
import io
import os
import sys
import time
from pathlib import Path

_CSV_HEADER = ["time", "event", "epoch", "name", "value"]
_WRITERS: dict[str, object] = {}  # one TensorBoard writer per run directory and process
_STEPS: dict[str, int] = {}


def _numbers(record: dict, prefix: str = ""):
    for key, value in record.items():
        if isinstance(value, bool) or key in ("time", "event", "epoch", "epochs"):
            continue
        if isinstance(value, (int, float)):
            yield prefix + key, float(value)
        elif isinstance(value, dict):
            yield from _numbers(value, f"{prefix}{key}/")


def write_csv(path: Path, record: dict) -> None:
    rows = [[record.get("time"), record.get("event"), record.get("epoch", ""), name, value]
            for name, value in _numbers(record)]
    if not rows:
        return
    new = not path.exists()
    with open(path, "a", newline="") as fh:
        writer = csv.writer(fh)
        if new:
            writer.writerow(_CSV_HEADER)
        writer.writerows(rows)


def write_tensorboard(folder: Path, record: dict) -> None:
    """Scalars as `event/name` at step = epoch (or the event's order in this process)."""
    key = str(folder)
    writer = _WRITERS.get(key)
    if writer is None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is an optional extra
            _WRITERS[key] = False
            return
        writer = _WRITERS[key] = SummaryWriter(log_dir=str(folder))
    if writer is False:
        return
    step = record.get("epoch")
    if step is None:
        step = _STEPS[key] = _STEPS.get(key, 0) + 1
    for name, value in _numbers(record):
        writer.add_scalar(f"{record.get('event', 'event')}/{name}", value, step)
    writer.flush()


class StderrLog(io.TextIOBase):
    """stderr, also written to RUN/log.txt once the run directory exists (lines printed
    before that are kept and written then), so each command leaves its text in the run."""

    def __init__(self, stream, run: Path, argv: list[str]):
        self.stream, self.run, self.fh = stream, Path(run), None
        self.pending = [f"\n$ ltcli {' '.join(argv)}    # {time.strftime('%Y-%m-%d %H:%M:%S')}, pid {os.getpid()}\n"]

    def _file(self):
        if self.fh is None and self.run.is_dir():
            try:
                self.fh = open(self.run / "log.txt", "a")
                self.fh.write("".join(self.pending))
                self.pending = []
            except OSError:
                self.fh = False
        return self.fh

    def write(self, text: str) -> int:
        n = self.stream.write(text)
        fh = self._file()
        if fh:
            fh.write(text)
            fh.flush()
        elif fh is None and sum(map(len, self.pending)) < 1 << 20:
            self.pending.append(text)
        return n if n is not None else len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    def close_log(self, code: int) -> None:
        fh = self._file()
        if fh:
            fh.write(f"# exit {code}\n")
            fh.close()
        self.fh = False


def run_argument(argv: list[str]) -> Path:
    """The --run a command line names (ltcli-run by default)."""
    for i, a in enumerate(argv):
        if a == "--run" and i + 1 < len(argv):
            return Path(argv[i + 1])
        if a.startswith("--run="):
            return Path(a.split("=", 1)[1])
    return Path("ltcli-run")


def install_log(argv: list[str]) -> StderrLog | None:
    if not argv or argv[0] in ("--help", "-h", "--version", "archs", "info") or "--help" in argv:
        return None
    log = StderrLog(sys.stderr, run_argument(argv), argv)
    sys.stderr = log
    return log

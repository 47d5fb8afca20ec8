"""The run directory: where every stage finds its inputs and leaves its outputs.

    run.json, config.toml, backbone.pt, backbone-last.pt, metrics.jsonl (+ .csv), log.txt,
    features/<split>.h5, heads/<method>.pt, reports/
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from .errors import LtcliError
from .io import append_line, atomic_write_json

RUN_FORMAT = 1
DEFAULT_RUN = "ltcli-run"
_HELD: dict[str, int] = {}  # run directories whose lock this process holds (and how deep)


class RunDir:
    def __init__(self, root: str | Path = DEFAULT_RUN):
        self.root = Path(root)

    # --- paths -------------------------------------------------------------------
    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    @property
    def backbone(self) -> Path:
        return self.root / "backbone.pt"

    @property
    def last_checkpoint(self) -> Path:
        return self.root / "backbone-last.pt"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def config(self) -> Path:
        return self.root / "config.toml"

    @property
    def features_dir(self) -> Path:
        return self.root / "features"

    def features(self, split: str) -> Path:
        return self.root / "features" / f"{split}.h5"

    def head(self, method: str) -> Path:
        return self.root / "heads" / f"{method}.pt"

    @property
    def heads_dir(self) -> Path:
        return self.root / "heads"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    # --- run.json ----------------------------------------------------------------
    def exists(self) -> bool:
        return self.run_json.exists()

    def read(self) -> dict[str, Any]:
        if not self.run_json.exists():
            raise LtcliError(
                f"{self.run_json}: not found; run `ltcli train-backbone --run {self.root}` first "
                "or pass explicit paths"
            )
        try:
            info = json.loads(self.run_json.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise LtcliError(f"{self.run_json}: not valid JSON ({exc})") from None
        if not isinstance(info, dict) or "class_names" not in info:
            raise LtcliError(f"{self.run_json}: not an ltcli run file (no class_names)")
        problem = _info_problem(info)
        if problem:
            raise LtcliError(f"{self.run_json}: not a valid ltcli run file ({problem})")
        return info

    def write(self, info: dict[str, Any]) -> None:
        atomic_write_json(self.run_json, info)

    def log_event(self, event: dict[str, Any]) -> None:
        """One JSON object per line in metrics.jsonl (epochs, extraction, heads, evals)."""
        from .tracking import write_csv, write_tensorboard

        self.root.mkdir(parents=True, exist_ok=True)
        record = {"time": round(time.time(), 3), **event}
        append_line(self.metrics, json.dumps(record, sort_keys=True))
        try:  # the mirrors never fail the job
            write_csv(self.root / "metrics.csv", record)
            write_tensorboard(self.root / "tensorboard", record)
        except (OSError, ValueError):
            pass

    def clear_artifacts(self) -> None:
        """--overwrite: remove everything the old run made (its checkpoints and every artifact
        that depends on them: features, heads, reports), so nothing stale outlives it."""
        import shutil

        for p in (self.backbone, self.last_checkpoint, self.metrics, self.config, self.run_json,
                  self.root / "metrics.csv"):
            p.unlink(missing_ok=True)
        for d in (self.features_dir, self.heads_dir, self.reports, self.root / "tensorboard", self.root / "exports"):
            if d.is_dir() and not d.is_symlink():
                shutil.rmtree(d)
            elif d.exists() or d.is_symlink():
                d.unlink()

    def has_other_files(self) -> bool:
        markers = [self.run_json, self.backbone, self.last_checkpoint, self.metrics]
        return any(p.exists() for p in markers)

    def has_checkpoint(self) -> bool:
        """A run that trained at least one epoch (a run.json alone is a run killed before it)."""
        return self.backbone.exists() or self.last_checkpoint.exists()

    @contextlib.contextmanager
    def writing(self, *, wait: bool = True, create: bool = False) -> Iterator[None]:
        """Hold the run's lock (RUN/.ltcli.lock) while writing into it. Every writing command
        takes it: one trains, extracts or fits into a run at a time, and a reader only ever
        sees complete files (each is renamed into place). wait=False refuses at once when
        another process holds it; otherwise this waits, saying for whom. Re-entrant within a
        process (quickstart's stages nest); a no-op when the run does not exist (create=False)."""
        if not self.root.is_dir():
            if not create:
                yield
                return
            self.root.mkdir(parents=True, exist_ok=True)
        key = os.path.realpath(self.root)
        if key in _HELD:
            _HELD[key] += 1
            try:
                yield
            finally:
                _HELD[key] -= 1
            return
        path = self.root / ".ltcli.lock"
        try:
            fh = open(path, "a+")
        except OSError as exc:
            raise LtcliError(f"{path}: cannot create the run's lock ({exc.strerror or exc})") from None
        try:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                holder = fh.read().strip() or "another ltcli process"
                if not wait:
                    raise LtcliError(f"--run {self.root}: {holder} is writing this run (lock {path}); wait for it "
                                     "to finish or choose another --run") from None
                from .console import err_console

                err_console.print(f"waiting for {holder} to finish writing {self.root} ...", highlight=False)
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            fh.seek(0)
            fh.truncate()
            fh.write(f"ltcli process {os.getpid()} ({' '.join(sys.argv[1:3])})\n")
            fh.flush()
            _HELD[key] = 1
            try:
                yield
            finally:
                del _HELD[key]
        finally:
            fh.close()


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _info_problem(info: dict[str, Any]) -> str | None:
    """What is wrong with a run.json's fields (the ones train-backbone always writes), or None."""
    names = info.get("class_names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        return "class_names is not a non-empty list of names"
    counts = info.get("train_counts")
    if not isinstance(counts, list) or len(counts) != len(names) or not all(_is_int(c) and c >= 0 for c in counts):
        return f"train_counts is not a list of {len(names)} counts"
    data = info.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("spec"), str):
        return "data is not an object with a spec"
    if not isinstance(info.get("dataset_id"), str):
        return "dataset_id missing"
    for key in ("splits", "fingerprints", "train_config"):
        if key in info and not isinstance(info[key], dict):
            return f"{key} is not an object"
    if info.get("image_size") is not None and not (_is_int(info["image_size"]) and info["image_size"] > 0):
        return "image_size is not a positive integer"
    return None


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def dataset_id(spec: str, class_names: list[str], train_counts: list[int], train_fingerprint: str) -> str:
    """One identifier shared by every split of a run's data, for provenance checks."""
    payload = json.dumps([spec, class_names, list(map(int, train_counts)), train_fingerprint])
    return hashlib.sha256(payload.encode()).hexdigest()

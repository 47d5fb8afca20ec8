"""Shared test helpers: run the `ltcli` command line as a user does, and one tiny trained run.

- `run_ltcli(*args, expect=0)`: `python -m ltcli ARGS` in a subprocess (CompletedProcess).
- `tiny_run` (session): {"run": Path, "proc": the train-backbone CompletedProcess}; a 2-epoch
  resnet8 on synthetic data (5 classes) trained once per session. Read-only: `copy_run` it.
- `tiny_pipeline` (session): a copy of the tiny run with features for train/val/test and the
  joint, crt and tau-norm heads. Read-only as well.
- `run_cli(args)`: the same command in this process through `ltcli.cli.main` (fast; used by
  the error catalogue), returning the exit code and the captured stdout/stderr.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LTCLI = [sys.executable, "-m", "ltcli"]


# --- subprocess: the real command line ----------------------------------------------------------

def cli_env(**extra) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("LTCLI_DEBUG", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_ltcli(*args, expect: int | None = 0, timeout: float = 600, input: str | None = None,
              env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m ltcli ARGS`; asserts the exit code is `expect` (None: any)."""
    proc = subprocess.run(LTCLI + [str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                          input=input, env=cli_env(**(env or {})))
    if expect is not None:
        assert proc.returncode == expect, (
            f"ltcli {' '.join(map(str, args))}: exit {proc.returncode}, expected {expect}\n"
            f"stdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-4000:]}"
        )
    return proc


def stdout_paths(proc) -> list[Path]:
    """stdout as the list of paths it prints, one per line."""
    return [Path(line) for line in proc.stdout.splitlines() if line.strip()]


def stdout_json(proc):
    """stdout as the single JSON object it must hold."""
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stdout
    return json.loads(lines[0])


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def copy_run(src, dst) -> Path:
    shutil.copytree(src, dst)
    return Path(dst)


# --- in process: ltcli.cli.main ------------------------------------------------------------------

@dataclass
class CliResult:
    code: int
    out: str
    err: str


def run_cli(args, stdin: str | None = None) -> CliResult:
    """`ltcli ARGS` in this process through `ltcli.cli.main` (what the console script runs):
    stdout/stderr captured, the exit code taken from SystemExit (0 when main returns)."""
    from ltcli.cli import main

    out, err = io.StringIO(), io.StringIO()
    old_stdin = sys.stdin
    sys.stdin = io.StringIO(stdin or "")
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main([str(a) for a in args])
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.stdin = old_stdin
    return CliResult(code, out.getvalue(), err.getvalue())


def ltcli_in_process(*args, expect: int | None = 0, input: str | None = None) -> subprocess.CompletedProcess:
    """`run_ltcli` without the 2-4 s of a new interpreter importing torch: the same command
    through `ltcli.cli.main` in this process, answered as a CompletedProcess. For tests of what a
    command does; `run_ltcli` stays for what only a real process shows (pipes, signals, exit)."""
    args = [str(a) for a in args]
    r = run_cli(args, stdin=input)
    if expect is not None:
        assert r.code == expect, (f"ltcli {' '.join(args)}: exit {r.code}, expected {expect}\n"
                                  f"stdout: {r.out[-2000:]}\nstderr: {r.err[-4000:]}")
    return subprocess.CompletedProcess(["ltcli", *args], r.code, r.out, r.err)


def check_ok(result: CliResult) -> CliResult:
    assert result.code == 0, f"exit {result.code}\n{result.err[-3000:]}"
    return result


# --- the shared tiny run ---------------------------------------------------------------------------

TINY_CLASSES = 5
TINY_TRAIN = ["--synthetic-classes", TINY_CLASSES, "--epochs", 2, "--batch-size", 128, "--device", "cpu",
              "--workers", 0]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> dict:
    """Train once per session; {"run": run dir, "proc": the train-backbone CompletedProcess}."""
    run = tmp_path_factory.mktemp("tiny") / "run"
    proc = run_ltcli("train-backbone", "--run", run, *TINY_TRAIN)
    return {"run": run, "proc": proc}


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_run, tmp_path_factory) -> Path:
    """The tiny run plus features (train/val/test) and heads joint, crt, tau-norm (in process)."""
    run = copy_run(tiny_run["run"], tmp_path_factory.mktemp("pipeline") / "run")
    check_ok(run_cli(["extract", "--run", run, "--split", "all", "--device", "cpu", "--workers", "0",
                      "--batch-size", "128"]))
    check_ok(run_cli(["fit-head", "--run", run, "--method", "joint"]))
    check_ok(run_cli(["fit-head", "--run", run, "--method", "crt", "--epochs", "2", "--device", "cpu"]))
    check_ok(run_cli(["tune-tau", "--run", run, "--split", "val", "--grid", "0:2:0.5"]))
    return run


# --- end-to-end helpers (test_cli.py, test_pipeline.py, test_ddp.py, test_realdata_cli.py) -------

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def stdout_files(proc, cwd=None) -> list[Path]:
    """Checks the stdout convention (README, "The pipeline, command by command"): every line is a bare path of an
    existing file, nothing else; returns the paths."""
    lines = proc.stdout.splitlines()
    assert lines, f"nothing on stdout; stderr:\n{proc.stderr[-2000:]}"
    paths = []
    for line in lines:
        assert line and line.strip() == line, f"stdout line {line!r} is not a bare path"
        p = Path(line) if cwd is None or Path(line).is_absolute() else Path(cwd) / line
        assert p.is_file(), f"stdout line {line!r} is not an existing file"
        paths.append(Path(line))
    return paths

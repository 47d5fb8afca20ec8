"""docs/errors.md is the single source: every row of its catalogue runs through the CLI here.

Each row must give its exit code (2), exactly one `ltcli: error:` line on stderr (the last line)
holding the row's message fragment (which names the culprit), nothing on stdout and no
traceback. The files the rows refer to ({bad_h5}, {pickle_head}, ...) are built once per session
by tests/catalogue_fixtures.py from the shared tiny run."""

from __future__ import annotations

import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

import catalogue_fixtures
from conftest import LTCLI, REPO, cli_env, run_cli
from faults.faultlib import logs_grew, run_files, run_logs

DOC = REPO / "docs" / "errors.md"
AREAS = {"data spec", "list file", "image", "option", "checkpoint", "features", "head", "τ grid", "job"}
PREFIX = {2: "ltcli: error: ", 1: "ltcli: failed: "}  # bad input / the job itself failed
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True)
class Row:
    num: int
    area: str
    what: str
    command: str
    message: str
    exit: int

    def fill(self, text: str, fx: dict[str, str]) -> str:
        def sub(m):
            if m.group(1) not in fx:
                raise KeyError(f"docs/errors.md row {self.num}: unknown placeholder {{{m.group(1)}}}")
            return fx[m.group(1)]

        return _PLACEHOLDER.sub(sub, text)

    def argv(self, fx: dict[str, str]) -> tuple[list[str], str | None]:
        """(arguments after `ltcli`, file to feed on stdin or None)."""
        tokens = shlex.split(self.command)
        stdin = None
        if len(tokens) >= 2 and tokens[-2] == "<":
            stdin = self.fill(tokens[-1], fx)
            tokens = tokens[:-2]
        return [self.fill(t, fx) for t in tokens], stdin


def _cells(line: str) -> list[str]:
    """A table row's cells; `\\|` is a literal pipe inside a cell (GitHub markdown's escape)."""
    cells = re.split(r"(?<!\\)\|", line.strip()[1:-1])
    return [c.strip().replace("\\|", "|") for c in cells]


def _unquote(cell: str) -> str:
    cell = cell.strip()
    return cell[1:-1] if len(cell) >= 2 and cell[0] == cell[-1] == "`" else cell


def parse_catalogue(text: str) -> list[Row]:
    """The rows of the table under '## Catalogue': | # | area | bad input | command | message | exit |"""
    rows, in_table = [], False
    for line in text.splitlines():
        if line.startswith("## "):
            in_table = line.strip() == "## Catalogue"
            continue
        if not in_table or not line.startswith("|"):
            continue
        cells = _cells(line)
        if not cells or not cells[0].isdigit():
            continue
        assert len(cells) == 6, f"docs/errors.md: row {cells[0]} has {len(cells)} cells, expected 6: {line}"
        num, area, what, command, message, code = cells
        rows.append(Row(int(num), area, what, _unquote(command), _unquote(message), int(code)))
    return rows


ROWS = parse_catalogue(DOC.read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def catalogue(tiny_pipeline, tmp_path_factory) -> dict[str, str]:
    fx = catalogue_fixtures.build(tmp_path_factory.mktemp("catalogue"), tiny_pipeline)
    fx["__run_files__"], fx["__run_logs__"] = run_files(tiny_pipeline), run_logs(tiny_pipeline)
    return fx


def _check(row: Row, fx: dict[str, str], code: int, out: str, err: str) -> None:
    want = row.fill(row.message, fx)
    context = f"row {row.num} ({row.what}): ltcli {row.command}\nstdout: {out[-1000:]}\nstderr: {err[-3000:]}"
    assert code == row.exit, f"exit {code}, expected {row.exit}; {context}"
    assert "Traceback" not in err, context
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(tuple(PREFIX.values()))]
    assert len(errors) == 1 and lines[-1] == errors[0], f"expected one error line, last on stderr; {context}"
    assert errors[0].startswith(PREFIX[row.exit]), f"expected {PREFIX[row.exit]!r}; {context}"
    assert want in errors[0], f"message lacks {want!r}; {context}"
    assert out == "", f"stdout must stay empty on errors; {context}"


# --- the table itself -------------------------------------------------------------------------------

def test_catalogue_is_well_formed():
    assert len(ROWS) >= 40
    assert [r.num for r in ROWS] == list(range(1, len(ROWS) + 1)), "rows are numbered 1, 2, 3, ..."
    assert AREAS <= {r.area for r in ROWS}, f"areas missing: {AREAS - {r.area for r in ROWS}}"
    for r in ROWS:
        assert r.area in AREAS, f"row {r.num}: unknown area {r.area!r}"
        assert r.message.strip() and r.command.strip(), f"row {r.num}: empty command or message"
        assert r.exit == (1 if r.area == "job" else 2), f"row {r.num}: bad input exits 2, a failed job 1"
    assert len({(r.command, r.message) for r in ROWS}) == len(ROWS), "duplicate rows"


def test_parser_reads_cells_and_stdin():
    text = "## Catalogue\n| # | a | b | c | d | e |\n|---|\n| 1 | option | x | `info {f} < {g}` | `{f}: bad \\|x` | 2 |\n"
    (row,) = parse_catalogue(text)
    assert row.argv({"f": "/a b", "g": "/in"}) == (["info", "/a b"], "/in")
    assert row.fill(row.message, {"f": "/a b"}) == "/a b: bad |x"


# --- every row, in process ---------------------------------------------------------------------------

@pytest.mark.parametrize("row", ROWS, ids=[f"{r.num:03d}-{r.area}-{r.what}"[:60] for r in ROWS])
def test_catalogue_row(row: Row, catalogue, tmp_path):
    fx = {**catalogue, "new": str(tmp_path / "new")}
    args, stdin_file = row.argv(fx)
    stdin = Path(stdin_file).read_text() if stdin_file else None
    result = run_cli(args, stdin=stdin)
    _check(row, fx, result.code, result.out, result.err)


def test_bad_inputs_changed_nothing(catalogue):
    """After every row ran: the crafted pickles never executed, and the shared run is untouched."""
    assert not Path(catalogue["marker"]).exists(), "a crafted checkpoint/head ran code"
    assert run_files(Path(catalogue["run"])) == catalogue["__run_files__"]
    assert logs_grew(Path(catalogue["run"]), catalogue["__run_logs__"])


# --- a sample through the real command line (subprocesses, in parallel) --------------------------

def _sample() -> list[Row]:
    """The first row of every area."""
    picked, seen = [], set()
    for r in ROWS:
        if r.area not in seen:
            picked.append(r)
            seen.add(r.area)
    return picked


@pytest.mark.slow
def test_catalogue_sample_as_subprocesses(catalogue, tmp_path):
    """One row per area as the user runs it: `python -m ltcli ...`, two at a time."""
    rows = _sample()
    running: list = []

    def finish(item):
        r, fx, proc = item
        out, err = proc.communicate(timeout=300)
        _check(r, fx, proc.returncode, out, err)

    for r in rows:
        fx = {**catalogue, "new": str(tmp_path / f"new-{r.num}")}
        args, stdin_file = r.argv(fx)
        stdin = open(stdin_file) if stdin_file else subprocess.DEVNULL
        running.append((r, fx, subprocess.Popen(LTCLI + args, stdin=stdin, stdout=subprocess.PIPE,
                                                 stderr=subprocess.PIPE, text=True, env=cli_env())))
        if len(running) == 2:
            finish(running.pop(0))
    for item in running:
        finish(item)

"""The `ltcli` command line: a thin client of the jobs (`ltcli.jobs`).

Each command's flags are generated from its options dataclass (one Opt per option: type,
default, bounds, help), read a `--config` file under the flags, build the options, call the
job's `run`, and print. Conventions: stdout carries only the path(s) a command wrote, one per
line (or one JSON object with --json); progress, tables and logs go to stderr. Exit codes:
0 ok, 1 the job failed (`ltcli: failed: ...`), 2 bad usage or input (one line naming the culprit).
"""

from __future__ import annotations

import inspect
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer

try:  # typer >= 0.2x vendors click; older releases use the click package
    from typer.exceptions import Abort as _Abort, Exit as _Exit, TyperException as _UsageBase
except ImportError:  # pragma: no cover - depends on the installed typer
    from click.exceptions import Abort as _Abort, ClickException as _UsageBase, Exit as _Exit

from . import __version__
from .errors import JobFailed, LtcliError
from .options import Opt

app = typer.Typer(
    name="ltcli",
    help=(
        "Long-tailed recognition by decoupling representation and classifier "
        "(Kang et al., ICLR 2020).\n\n"
        "Train a backbone once, cache its features once, then fit and compare every "
        "classifier-rebalancing head in seconds, per many / medium / few-shot group.\n\n"
        "Pipeline: train-backbone -> extract -> fit-head / tune-tau -> eval.  "
        "`ltcli quickstart` runs all of it on a built-in synthetic long-tailed dataset."
    ),
    no_args_is_help=False,
    add_completion=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)

_DEBUG = {"on": bool(os.environ.get("LTCLI_DEBUG"))}
RUN_HELP = "Run directory holding run.json, backbone.pt, features/, heads/, reports/."


def _version(value: bool):
    if value:
        typer.echo(f"ltcli {__version__}")
        raise typer.Exit()


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
):
    if debug:
        _DEBUG["on"] = True
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help(), err=True)
        raise LtcliError("a command is missing (ltcli --help lists them)")


# --- flags generated from options ------------------------------------------------------------------

_TYPES = {int: int, float: float, str: str, bool: bool, Path: Path}
_METAVARS = {int: "INTEGER", float: "FLOAT", str: "TEXT", Path: "PATH", list: "TEXT"}


def _param(name: str, o: Opt, help_prefix: str = "") -> inspect.Parameter:
    """A typer parameter for one Opt; its default is None ("not given": the options dataclass,
    or a config file, supplies it)."""
    flag = o.flag_name(name)
    text = help_prefix + o.help_text()
    if o.argument:
        annotation = Optional[List[str]] if o.kind is list else Optional[_TYPES[o.kind]]
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                 default=typer.Argument(None, help=text, show_default=False))
    if o.kind is bool:
        decl, annotation = f"{flag}/--no-{flag[2:]}", Optional[bool]
    elif o.kind is list:
        decl, annotation = flag, Optional[List[str]]
    else:
        decl, annotation = flag, Optional[_TYPES[o.kind]]
    metavar = o.metavar or ("|".join(o.choices) if o.choices else _METAVARS.get(o.kind))
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                             default=typer.Option(None, decl, help=text, metavar=metavar, show_default=False))


def _plain_param(name: str, annotation, option) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=option)


RUN_PARAM = _plain_param("run", Path, typer.Option(Path("ltcli-run"), "--run", help=RUN_HELP))
JSON_PARAM = _plain_param("as_json", bool, typer.Option(False, "--json", help="Print one JSON object on stdout "
                                                                                "instead of paths."))
CONFIG_PARAM = _plain_param("config", Optional[Path], typer.Option(
    None, "--config", help="TOML file of options (flags override it); see docs/config.md."))


def command(name: str, options_cls, *, doc: str, extra: list[inspect.Parameter] = (),
            more_options: dict[str, tuple[Opt, str]] | None = None):
    """Register `name`: flags from `options_cls` (+ `more_options`: name -> (Opt, help prefix)),
    then `extra` plain parameters; the decorated function gets (values: dict, **extra)."""
    def decorate(fn: Callable[..., Any]):
        params = [_param(n, o) for n, o in options_cls.spec().items() if o.cli]
        params += [_param(n, o, prefix) for n, (o, prefix) in (more_options or {}).items()]
        params += list(extra)

        def callback(**kw):
            values = {k: kw.pop(k) for k in list(kw) if k not in {p.name for p in extra}}
            return fn({k: v for k, v in values.items() if v is not None}, **kw)

        callback.__signature__ = inspect.Signature(params)
        callback.__annotations__ = {p.name: p.annotation for p in params}
        callback.__doc__ = doc
        callback.__name__ = name.replace("-", "_")
        app.command(name)(callback)
        return fn

    return decorate


def build_options(options_cls, given: dict, config: Path | None, *, head_keys: set[str] = frozenset()):
    """Options from defaults < config file < flags; head options gathered into `head`."""
    from .config import load_config

    known = set(options_cls.spec()) | set(head_keys)
    values = dict(given)
    if config is not None:
        method = given.get("method")
        from_file = load_config(config, options_cls.command, known, method)
        if method is None and from_file.get("method"):
            from_file = load_config(config, options_cls.command, known, from_file["method"])
        values = {**from_file, **given}
    head = {k: values.pop(k) for k in list(values) if k in head_keys and k not in options_cls.spec()}
    if head_keys:
        values["head"] = head
    return options_cls(**values)


def out(lines) -> None:
    """Lines to stdout; a reader that stops reading (`| head -1`) ends the command quietly, exit 0."""
    try:
        for line in lines:
            sys.stdout.write(f"{line}\n")
        sys.stdout.flush()
    except BrokenPipeError:
        _quiet_stdout()
        raise typer.Exit(0) from None


def emit(paths: list, as_json: bool, payload: Optional[dict] = None) -> None:
    """stdout: one path per line, or a single JSON object."""
    if as_json:
        out([json.dumps(payload if payload is not None else {"paths": [str(p) for p in paths]}, default=str)])
    else:
        out(map(str, paths))


def _rank0() -> bool:
    from .runtime import process_rank

    return process_rank() == 0


def _rundir(path: Path):
    from .rundir import RunDir

    return RunDir(path)


# --- the commands --------------------------------------------------------------------------------

from .jobs import evaluate as _evaluate, extract as _extract, fit as _fit, import_features as _import  # noqa: E402
from .jobs import export as _export  # noqa: E402
from .jobs import predict as _predict, quickstart as _quickstart, train as _train, tune as _tune  # noqa: E402


def _head_flags(methods: list[str] | None = None, skip: tuple[str, ...] = ()) -> dict[str, tuple[Opt, str]]:
    """fit-head / tune-tau flags of the heads' own options, from the registry."""
    from .heads.registry import all_options

    out = {}
    for name, (o, users) in all_options().items():
        users = [m for m in users if methods is None or m in methods]
        if users and name not in skip:
            out[name] = (o, f"{' / '.join(users)}: ")
    return out


@command("train-backbone", _train.TrainOptions, doc="""Stage 1: train a backbone + joint classifier on the
(long-tailed) train split.

Writes run.json, config.toml (every option, resolved), backbone.pt, backbone-last.pt (every epoch, for
--resume) and metrics.jsonl. `--config RUN/config.toml --run NEW` repeats a run. Under torchrun it trains
with DDP: `torchrun --nproc-per-node N -m ltcli -- train-backbone ...` (the `--` keeps torchrun from
taking `--run` for its own `--run-path`).""", extra=[
    RUN_PARAM, CONFIG_PARAM,
    _plain_param("resume", bool, typer.Option(False, "--resume", help="Continue from backbone-last.pt "
                                                                      "(same configuration).")),
    _plain_param("overwrite", bool, typer.Option(False, "--overwrite", help="Replace another run in --run "
                                                                            "(its features, heads, reports too).")),
    JSON_PARAM])
def train_backbone_cmd(values, *, run, config, resume, overwrite, as_json):
    opts = build_options(_train.TrainOptions, values, config)
    result = _train.run(opts, _rundir(run), resume=resume, overwrite=overwrite)
    if _rank0():
        emit([result.backbone], as_json, {"backbone": str(result.backbone), "run": str(result.run),
                                          "epochs": result.history})


@command("extract", _extract.ExtractOptions, doc="""Run the backbone once over a split and cache its features
in HDF5.

Resumable (rerun the same command after a crash), reused when complete, refused when it would mix
backbones. Prints the .h5 path(s) on stdout. Under torchrun the split is sharded:
`torchrun --nproc-per-node N -m ltcli -- extract --run DIR ...`.""", extra=[RUN_PARAM, CONFIG_PARAM, JSON_PARAM])
def extract_cmd(values, *, run, config, as_json):
    paths = _extract.run(build_options(_extract.ExtractOptions, values, config), _rundir(run))
    if _rank0():
        emit(paths, as_json, {"features": [str(p) for p in paths]})


def _fit_doc() -> str:
    from .heads import HEADS, methods

    lines = "\n\n".join(f"{m}: {HEADS[m].summary}" for m in methods())
    return ("Fit one classifier head on cached train features (seconds; no backbone needed).\n\n"
            f"{lines}\n\nPrints the head path on stdout, so it chains: "
            "`ltcli extract --run r --split train | ltcli fit-head --features - --method crt --run r`")


@command("fit-head", _fit.FitOptions, doc=_fit_doc(), more_options=_head_flags(),
         extra=[RUN_PARAM, CONFIG_PARAM, JSON_PARAM])
def fit_head_cmd(values, *, run, config, as_json):
    opts = build_options(_fit.FitOptions, values, config, head_keys=set(_head_flags()))
    result = _fit.run(opts, _rundir(run))
    emit([result.path], as_json, {"head": str(result.path), "method": result.method, "options": result.options})


def _tune_flags():
    from .heads import tunable_methods

    return _head_flags(tunable_methods(), skip=("tau",))


@command("tune-tau", _tune.TuneOptions, doc="""Choose τ of a tunable head by grid search on a held-out split.

The dot products are computed once; each τ only rescales or shifts columns, so the whole grid costs about
one evaluation. Prints the per-τ table, writes the head with the best τ.""", more_options=_tune_flags(),
         extra=[RUN_PARAM, CONFIG_PARAM, JSON_PARAM])
def tune_tau_cmd(values, *, run, config, as_json):
    opts = build_options(_tune.TuneOptions, values, config, head_keys=set(_tune_flags()))
    result = _tune.run(opts, _rundir(run))
    emit(result["paths"], as_json, {"best": result["best"], "rows": result["rows"],
                                    "paths": [str(p) for p in result["paths"]]})


@command("eval", _evaluate.EvalOptions, doc="""Evaluate every head (or those named) on a split: top-1, top-5,
macro, many / medium / few.

Writes reports/eval-SPLIT.json and a per-class CSV; prints the report paths. --json prints the full report
(all heads, all metrics).""", extra=[RUN_PARAM, CONFIG_PARAM, JSON_PARAM])
def eval_cmd(values, *, run, config, as_json):
    result = _evaluate.run(build_options(_evaluate.EvalOptions, values, config), _rundir(run))
    emit(result["paths"], as_json, result["summary"])


@command("import-features", _import.ImportOptions, doc="""Import features computed elsewhere (CLIP, DINOv2,
any backbone) as a split of a run: every head, tune-tau, eval and info then work on them.

Import --split train first (it fixes the classes, counts and ids), then val and test:
`ltcli import-features train.npz --run r`, `ltcli import-features val.npy --labels val_labels.npy --split val
--run r`. Without --classifier the baseline is a linear probe fitted on the train features.""",
         extra=[RUN_PARAM, CONFIG_PARAM, JSON_PARAM])
def import_features_cmd(values, *, run, config, as_json):
    path = _import.run(build_options(_import.ImportOptions, values, config), _rundir(run))
    emit([path], as_json, {"features": str(path)})


@command("export", _export.ExportOptions, doc="""Export backbone + head as one self-contained file: uint8 images
(or, with --features-only, features) in, class scores out.

A torch.export program (.pt2, `torch.export.load(path).module()`) or ONNX (--format onnx); the
preprocessing, class names and provenance are recorded inside. Every head with a linear form exports, and
NCM; kNN cannot (it searches the train features at every query).""", extra=[RUN_PARAM, JSON_PARAM])
def export_cmd(values, *, run, as_json):
    path = _export.run(build_options(_export.ExportOptions, values, None), _rundir(run))
    emit([path], as_json, {"export": str(path)})


@app.command("info")
def info_cmd(
    path: Path = typer.Argument(..., help="A features .h5 file."),
    as_json: bool = typer.Option(False, "--json", help="Print the information as JSON on stdout."),
):
    """Describe a feature cache: shape, dtype, split, classes with counts and shot groups,
    provenance and completeness."""
    from .cache import info, info_table
    from .console import err_console

    d = info(path)
    if as_json:
        out([json.dumps(d, default=str)])
    else:
        err_console.print(info_table(d))


@command("predict", _predict.PredictOptions, doc="""Label new images with the backbone and a fitted head; prints
CSV (path, label1, score1, ...) or JSON on stdout.

Unreadable images are reported on stderr and skipped; the exit code is then 2.""",
         extra=[RUN_PARAM, CONFIG_PARAM])
def predict_cmd(values, *, run, config):
    opts = build_options(_predict.PredictOptions, values, config)
    out = _PredictPrinter(opts.format)
    done, bad, first = _predict.run(opts, _rundir(run), out)
    out.close()
    if bad:  # every readable image was labelled; say which were not, and exit 2
        raise LtcliError(first if not done else f"{bad} of {done + bad} images could not be read (first: {first})")


class _PredictPrinter:
    """Rows to stdout as they come: CSV with one header, or one JSON list."""

    def __init__(self, fmt: str):
        self.fmt, self.started = fmt, False

    def __call__(self, rows: list[dict]) -> None:
        try:
            self._write(rows)
        except BrokenPipeError:
            _quiet_stdout()
            raise typer.Exit(0) from None

    def _write(self, rows: list[dict]) -> None:
        import csv

        for r in rows:
            if self.fmt == "json":
                sys.stdout.write(("[" if not self.started else ",\n") + json.dumps(r))
            else:
                writer = csv.writer(sys.stdout)
                if not self.started:
                    k = len(r["labels"])
                    writer.writerow(["path"] + [c for i in range(1, k + 1) for c in (f"label{i}", f"score{i}")])
                writer.writerow([r["path"]] + [v for pair in zip(r["labels"], r["scores"]) for v in pair])
            self.started = True
        sys.stdout.flush()

    def close(self) -> None:
        if self.fmt == "json":
            sys.stdout.write(("]" if self.started else "[]") + "\n")
            sys.stdout.flush()


@command("quickstart", _quickstart.QuickstartOptions, doc="""The whole recipe in one go: train (instance
sampling), extract, fit every head, tune τ on val, evaluate on test, and print the comparison table of every
head against the jointly trained baseline.

With no options it runs on the built-in synthetic long-tailed dataset on the CPU in about a minute.""",
         extra=[RUN_PARAM, CONFIG_PARAM,
                _plain_param("overwrite", bool, typer.Option(False, "--overwrite", help="Retrain and rewrite "
                                                                                        "everything in --run.")),
                _plain_param("as_json", bool, typer.Option(False, "--json", help="Print the evaluation summary "
                                                                                 "as JSON."))])
def quickstart_cmd(values, *, run, config, overwrite, as_json):
    opts = build_options(_quickstart.QuickstartOptions, values, config)
    result = _quickstart.run(opts, _rundir(run), overwrite=overwrite)
    emit(result["paths"], as_json, result["summary"])


@app.command("archs")
def archs_cmd(timm: bool = typer.Option(False, "--timm", help="Also list timm's models (as timm:NAME).")):
    """List the backbone architectures --arch accepts (timm:NAME for timm's models)."""
    from .models import available_archs

    out(available_archs(timm=timm))


# --- entry point ---------------------------------------------------------------------------------


def main(argv: Optional[List[str]] = None) -> None:
    """Entry point: run the app and turn every failure into a one-line message + exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--"]:
        # `torchrun ... -m ltcli -- train-backbone --run DIR`: the `--` stops torchrun's argparse
        # from reading `--run` as an abbreviation of its own --run-path (an "ambiguous option"
        # error); Python versions that pass the `--` on to us get it dropped here
        args = args[1:]
    if "--debug" in args:
        _DEBUG["on"] = True
    from .tracking import install_log

    log = install_log(args)
    try:
        _main(args)
    except SystemExit as exc:
        if log is not None:
            log.close_log(exc.code if isinstance(exc.code, int) else 1)
            sys.stderr = log.stream
        raise
    if log is not None:
        log.close_log(0)
        sys.stderr = log.stream


def _main(args: list[str]) -> None:
    try:
        app(args=args, prog_name="ltcli", standalone_mode=False)
    except _Exit as exc:
        sys.exit(exc.exit_code)
    except _Abort:
        typer.echo("ltcli: aborted", err=True)
        sys.exit(130)
    except BrokenPipeError:  # `ltcli archs | head -1`: the reader has what it wanted
        _quiet_stdout()
        sys.exit(0)
    except KeyboardInterrupt:
        typer.echo("ltcli: interrupted", err=True)
        sys.exit(130)
    except (_UsageBase, LtcliError, JobFailed) as exc:
        if _DEBUG["on"]:
            raise
        failed = isinstance(exc, JobFailed)
        text = exc.format_message() if isinstance(exc, _UsageBase) else str(exc)
        typer.echo(f"ltcli: {'failed' if failed else 'error'}: {_one_line(text)}", err=True)
        sys.exit(1 if failed else 2)
    except Exception as exc:  # a bug or an environment failure: still one line, exit 1
        if _DEBUG["on"]:
            raise
        typer.echo(f"ltcli: failed: {type(exc).__name__}: {_one_line(str(exc))} (rerun with --debug for the "
                   "traceback)", err=True)
        sys.exit(1)


def _quiet_stdout() -> None:
    """After a broken pipe, point stdout at /dev/null so Python's exit flush stays silent."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _one_line(text: str) -> str:
    return " ".join(text.strip().split())

"""Config files (`--config FILE`, TOML): options from a file, flags override them.

Two shapes:

- flat: every key is an option of the command the file is given to. train-backbone writes
  its fully resolved options this way into RUN/config.toml, so
  `ltcli train-backbone --config RUN/config.toml --run NEW` repeats the run;
- sectioned: a table per command (`[train-backbone]`, `[extract]`, `[fit-head]`, and
  `[fit-head.crt]` for one head's options), so one file can describe a whole recipe
  (bench/presets/*.toml). Top-level keys of a sectioned file are shared: a command takes those
  it knows (`seed`, say) and ignores the rest.

Keys are option names with `_` or `-` (`weight_decay`, `weight-decay`); paths are relative to
the current directory, as on the command line.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

from .errors import LtcliError
from .io import atomic_write_text, check_regular_file

try:  # Python >= 3.11
    import tomllib
except ImportError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

COMMANDS = ("train-backbone", "quickstart", "extract", "fit-head", "tune-tau", "eval", "predict", "import-features")
MAX_CONFIG_BYTES = 1 << 20


def _key(name: str) -> str:
    return name.replace("-", "_")


def read_toml(path: str | Path) -> dict:
    path = check_regular_file(path, "config file")
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise LtcliError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise LtcliError(f"{path}: config file larger than {MAX_CONFIG_BYTES >> 10} KiB")
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise LtcliError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise LtcliError(f"{path}: not valid TOML ({exc})") from None


def load_config(path: str | Path, command: str, known: Iterable[str], method: str | None = None) -> dict[str, Any]:
    """The options a config file gives `command` (keys normalised to option names).

    known: the option names the command accepts; an unknown key of the command's own
    section (or of a flat file) is refused, naming the file and the key."""
    doc = read_toml(path)
    known = set(known)
    sectioned = any(isinstance(v, dict) and k in COMMANDS for k, v in doc.items())
    if not sectioned:
        return _checked(doc, known, path, "")
    values = {_key(k): v for k, v in doc.items() if not isinstance(v, dict) and _key(k) in known}
    section = doc.get(command, {})
    own = {k: v for k, v in section.items() if not isinstance(v, dict)}
    values.update(_checked(own, known, path, f"[{command}] "))
    if method is not None and isinstance(section.get(method), dict):
        values.update(_checked(section[method], known, path, f"[{command}.{method}] "))
    return values


def _checked(table: dict, known: set[str], path, where: str) -> dict[str, Any]:
    out = {}
    for k, v in table.items():
        if isinstance(v, dict):
            raise LtcliError(f"{path}: {where}table '{k}' is not a command (sections: {', '.join(COMMANDS)})")
        if _key(k) not in known:
            raise LtcliError(f"{path}: {where}unknown option '{k}'")
        out[_key(k)] = v
    return out


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf"))
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v), ensure_ascii=False)  # a TOML basic string


def dump_toml(values: dict[str, Any], header: str = "") -> str:
    """Flat TOML of option values (None is left out: the option keeps its default)."""
    lines = [f"# {line}" for line in header.splitlines()]
    lines += [f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None]
    return "\n".join(lines) + "\n"


def write_config(path: Path, options) -> None:
    """RUN/config.toml: every option of the run, resolved (defaults, config file, flags)."""
    header = (f"ltcli {options.command}: every option of this run, resolved.\n"
              f"Repeat it with: ltcli {options.command} --config {path} --run NEW_RUN")
    atomic_write_text(path, dump_toml(options.to_dict(), header))

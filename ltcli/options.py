"""Options, declared once: what a value may be, how it is checked, how it is spelled.

Every job's options are a keyword-only dataclass whose fields carry an `Opt` (its type,
default, bounds, help). The dataclass validates itself on construction, the command line is
generated from it (`ltcli.cli`), a config file fills it (`ltcli.config`), and `--help` and the
error messages all come from the same `Opt`. Heads declare their options the same way.

Bad values raise `LtcliError("--flag VALUE: what is wrong")`, one line naming the flag.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from .errors import LtcliError


def or_list(items, word: str = "or") -> str:
    """'a', 'a or b', 'a, b or c' (or 'and' with word="and")."""
    items = [str(i) for i in items]
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} {word} {items[-1]}"


@dataclass(frozen=True)
class Opt:
    """One option: its default and the values it accepts.

    kind: int, float, bool, str, Path or list (a list of strings). Bounds: `min` / `max`
    inclusive, `positive` (> 0), `below` (exclusive upper bound). `rule` overrides the phrase
    of the error message ("must be ..."). `optional`: None is a valid value."""

    default: Any
    kind: type
    help: str = ""
    min: float | None = None
    max: float | None = None
    positive: bool = False
    below: float | None = None
    choices: tuple[str, ...] | None = None
    optional: bool = False
    rule: str | None = None
    flag: str | None = None  # default: --name-with-dashes
    argument: bool = False  # positional on the command line
    cli: bool = True  # False: Python API / config only
    metavar: str | None = None  # how --help shows the value (default: the choices, or the type)

    def flag_name(self, name: str) -> str:
        return self.flag or "--" + name.replace("_", "-")

    # ---- checking ------------------------------------------------------------------------
    def check(self, name: str, value: Any) -> Any:
        flag = self.flag_name(name)
        if value is None:
            if self.optional:
                return None
            raise LtcliError(f"{flag}: a value is required")
        if self.kind is bool:
            if not isinstance(value, bool):
                raise LtcliError(f"{flag}: expected true or false, got {value!r}")
            return value
        if self.kind is list:
            if isinstance(value, (str, Path)):
                value = [value]
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, (str, Path)) for v in value):
                raise LtcliError(f"{flag}: expected a list of strings, got {value!r}")
            return [str(v) for v in value]
        if self.kind in (str, Path):
            if not isinstance(value, (str, Path)):
                raise LtcliError(f"{flag}: expected a string, got {value!r}")
            if self.choices and str(value) not in self.choices:
                raise LtcliError(f"{flag} {value}: {self.rule or 'choose ' + or_list(self.choices)}")
            return Path(value) if self.kind is Path else str(value)
        return self._check_number(flag, value)

    def _check_number(self, flag: str, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise LtcliError(f"{flag}: expected a number, got {value!r}")
        if self.kind is int:
            if isinstance(value, float):
                if not (math.isfinite(value) and value == int(value)):
                    raise LtcliError(f"{flag}: expected an integer, got {value!r}")
                value = int(value)
        else:
            value = float(value)
        bounded = self.positive or any(b is not None for b in (self.min, self.max, self.below))
        if bounded and not self._within(value):
            raise LtcliError(f"{flag} {value}: {self.rule or self._phrase(value)}")
        return value

    def _within(self, v: float) -> bool:
        if isinstance(v, float) and not math.isfinite(v):
            return False
        return not ((self.positive and not v > 0) or (self.min is not None and v < self.min)
                    or (self.max is not None and v > self.max) or (self.below is not None and v >= self.below))

    def _phrase(self, value) -> str:
        """What the value must be, for the bound it breaks."""
        def fmt(v):
            return str(int(v)) if self.kind is int else f"{v:g}"

        lo = "0" if self.positive else (None if self.min is None else fmt(self.min))
        too_high = math.isfinite(value) and ((self.max is not None and value > self.max)
                                             or (self.below is not None and value >= self.below))
        if self.kind is int:
            if too_high:
                return f"must be at most {fmt(self.max)}"
            return f"must be at least {lo}" if self.min and self.min >= 1 else f"must be >= {lo}"
        if self.below is not None or self.max is not None:
            left = "(" if self.positive else "["
            right = f"{fmt(self.below)})" if self.below is not None else f"{fmt(self.max)}]"
            return f"must be in {left}{lo}, {right}"
        if self.positive:
            return "must be positive"
        return f"must be a finite number >= {lo}"

    def help_text(self) -> str:
        shown = self.default if not isinstance(self.default, (list, tuple)) else ",".join(map(str, self.default))
        default = "" if self.default is None or self.default == [] else f" [default: {shown}]"
        return f"{self.help}{default}"


SEED_RULE = "must be between 0 and 2**63 - 1"  # numpy and torch generators take 0 <= seed < 2**63


def seed_opt(help: str) -> Opt:
    return Opt(0, int, help, min=0, max=2**63 - 1, rule=SEED_RULE)


def opt(default: Any, kind: type, help: str = "", **kw: Any) -> Any:
    """A dataclass field carrying its Opt (for a job's options dataclass)."""
    o = Opt(default, kind, help, **kw)
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"opt": o})
    return dataclasses.field(default=default, metadata={"opt": o})


class Options:
    """Base of the job options dataclasses: every field is checked by its Opt on construction,
    then `validate()` checks what involves several fields."""

    command: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            o = f.metadata.get("opt")
            if o is not None:
                object.__setattr__(self, f.name, o.check(f.name, getattr(self, f.name)))
        self.validate()

    def validate(self) -> None:
        """Checks across fields (override)."""

    @classmethod
    def spec(cls) -> dict[str, Opt]:
        return {f.name: f.metadata["opt"] for f in dataclasses.fields(cls) if "opt" in f.metadata}

    def to_dict(self) -> dict[str, Any]:
        """Every option as a plain value (paths as strings): what a config file holds."""
        out = {}
        for name in self.spec():
            value = getattr(self, name)
            out[name] = str(value) if isinstance(value, Path) else value
        return out

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)

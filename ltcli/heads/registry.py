"""The head registry: the one place that knows which heads exist.

A head module defines a `Head` subclass and decorates it with `@register`; importing the
module (one line in `ltcli/heads/__init__.py`) makes it known to every command: `fit-head`'s
options and `--help`, quickstart's table, `tune-tau`'s methods, `eval`'s order, export, and
the registry-driven tests."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import LtcliError
from ..options import Opt, or_list

if TYPE_CHECKING:
    from .base import Head

HEADS: dict[str, type["Head"]] = {}


def register(cls: type["Head"]) -> type["Head"]:
    if not cls.method or cls.method in HEADS:
        raise ValueError(f"head {cls.__name__}: method name {cls.method!r} missing or taken")
    HEADS[cls.method] = cls
    return cls


def methods() -> list[str]:
    """Every head name, in table order (the paper's first)."""
    return [cls.method for cls in sorted(HEADS.values(), key=lambda c: (c.order, c.method))]


def tunable_methods() -> list[str]:
    return [m for m in methods() if HEADS[m].tunable]


def baseline_method() -> str:
    return next(m for m in methods() if HEADS[m].baseline)


def head_class(method: str) -> type["Head"]:
    """The class for a method name ('tau_norm' is accepted for 'tau-norm')."""
    key = str(method).strip().lower().replace("_", "-")
    if key not in HEADS:
        raise LtcliError(f"--method {method}: unknown head (choose {or_list(methods())})")
    return HEADS[key]


def all_options() -> dict[str, tuple[Opt, list[str]]]:
    """Every head option: (its Opt as the first head declares it, the heads that take it).
    fit-head's command line is built from this."""
    out: dict[str, tuple[Opt, list[str]]] = {}
    for m in methods():
        for name, o in HEADS[m].options_spec.items():
            if name in out:
                out[name][1].append(m)
            else:
                out[name] = (o, [m])
    return out

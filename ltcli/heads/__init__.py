"""Classifier heads over cached features: one module per method, one small interface.

    head = build_head("tau-norm", tau=1.0).fit(train_features)
    scores = head.logits_for(test_features)          # N x C, higher = better
    save_head(head, "heads/tau-norm.pt", provenance={...})
    head, provenance = load_head("heads/tau-norm.pt")

Head files hold only tensors and plain values: {"format": 1, "method", "options",
"state", "provenance"}, loaded with weights_only=True."""

from __future__ import annotations

import os
from typing import Any

import torch

from ..errors import LtcliError
from ..io import atomic_torch_save, safe_torch_load
from .base import Head
from .registry import HEADS, baseline_method, head_class, methods, register, tunable_methods

# each head module registers its head; adding a head = one module + its name here
from . import joint, ncm, crt, tau_norm, lws, logit_adjust, knn  # noqa: E402,F401  isort: skip

FORMAT = 1

__all__ = [
    "FORMAT", "HEADS", "Head", "available_methods", "baseline_method", "build_head", "head_class",
    "load_head", "methods", "register", "save_head", "tunable_methods",
]


def available_methods() -> list[str]:
    return methods()


def build_head(method: str, **options: Any) -> Head:
    """An unfitted head; options are checked now (LtcliError naming the bad --option)."""
    return head_class(method)(**options)


def _check_plain(obj: Any, where: str) -> None:
    """Only what weights_only loading accepts back may be saved."""
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor)):
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: key {k!r} is not a string")
            _check_plain(v, f"{where}.{k}")
        return
    raise TypeError(f"{where}: {type(obj).__name__} cannot be saved in a head file (plain values only)")


def save_head(head: Head, path: str | os.PathLike, provenance: dict) -> None:
    """Write the head atomically: a crash never leaves a half-written file at `path`."""
    payload = {
        "format": FORMAT,
        "method": head.method,
        "options": dict(head.options),
        "state": head.state(),
        "provenance": dict(provenance),
    }
    _check_plain(payload, "head")
    atomic_torch_save(payload, path)


# provenance fields the stages compare or print, and the types they must have when present
_PROVENANCE_TYPES: dict[str, tuple[type, ...]] = {
    "backbone_sha256": (str,), "dataset_id": (str,), "features": (str,), "method": (str,),
    "tuned_on": (str,), "tuned_file": (str,), "metric": (str,), "feature_dim": (int,),
    "num_classes": (int,), "class_names": (list,), "options": (dict,), "grid": (list,), "sweep": (list,),
}


def _check_provenance(path, prov: dict) -> None:
    for key, types in _PROVENANCE_TYPES.items():
        value = prov.get(key)
        if value is None:
            continue
        if not isinstance(value, types) or (int in types and isinstance(value, bool)):
            raise LtcliError(f"{path}: head provenance '{key}' is a {type(value).__name__}, "
                             f"expected {' or '.join(t.__name__ for t in types)}")
    names = prov.get("class_names")
    if names is not None and not all(isinstance(n, str) for n in names):
        raise LtcliError(f"{path}: head provenance 'class_names' is not a list of names")


def load_head(path: str | os.PathLike) -> tuple[Head, dict]:
    """(head, provenance); LtcliError naming the file on anything unexpected in it."""
    payload = safe_torch_load(path, what="head")
    if not isinstance(payload, dict):
        raise LtcliError(f"{path}: not an ltcli head file (holds a {type(payload).__name__})")
    missing = [k for k in ("format", "method", "state", "provenance") if k not in payload]
    if missing:
        raise LtcliError(f"{path}: not an ltcli head file (missing {', '.join(repr(k) for k in missing)})")
    fmt = payload["format"]
    if fmt != FORMAT or isinstance(fmt, bool):
        raise LtcliError(f"{path}: head format {fmt!r} is not supported (this ltcli reads format {FORMAT})")
    method = payload["method"]
    if not isinstance(method, str) or method not in HEADS:
        raise LtcliError(f"{path}: unknown head method {method!r} (known: {', '.join(HEADS)})")
    if not isinstance(payload["provenance"], dict):
        raise LtcliError(f"{path}: head provenance is not a dict")
    _check_provenance(path, payload["provenance"])
    try:
        head = HEADS[method].from_state(payload["state"])
    except LtcliError as exc:
        raise LtcliError(f"{path}: malformed {method} head: {exc}") from None
    head.file = str(path)  # where it was read from (a kNN head finds its run's features beside it)
    return head, payload["provenance"]

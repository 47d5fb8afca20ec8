"""Backbone weights from a local file: a plain state_dict (.pth / .pt), a timm or torchvision
checkpoint, a .safetensors file, or an ltcli backbone checkpoint.

Files are read with weights_only loading (or safetensors, which holds tensors only); the
common wrappers are unwrapped (`state_dict`, `model`, `module` entries; `module.` and
`_orig_mod.` prefixes from DDP and torch.compile), the keys of the classifier the backbone no
longer has are dropped, and a mismatch names the first missing or unexpected key."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .errors import LtcliError
from .io import check_regular_file, safe_torch_load

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".tar")
_WRAPPERS = ("state_dict", "model", "model_state", "model_state_dict", "module", "net", "network")
_PREFIXES = ("module.", "_orig_mod.", "model.")


def is_weights_file(value: str | None) -> bool:
    """--weights names a local file (not a torchvision enum name or 'pretrained')."""
    if not value:
        return False
    return os.path.sep in value or value.endswith(WEIGHT_SUFFIXES) or Path(value).exists()


def _tensor_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                       for k, v in obj.items())


def read_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict a weights file holds, unwrapped."""
    path = check_regular_file(path, "weights file")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:  # pragma: no cover - a declared dependency
            raise LtcliError(f"{path}: reading .safetensors needs the safetensors package") from None
        try:
            state = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise LtcliError(f"{path}: not a valid .safetensors file ({str(exc).splitlines()[0][:120]})") from None
    else:
        state = safe_torch_load(path, "weights file")
    if isinstance(state, dict) and state.get("kind") == "ltcli-backbone":
        state = {k[len("encoder."):]: v for k, v in state.get("model", {}).items() if k.startswith("encoder.")}
    for _ in range(3):  # {"state_dict": {"model": {...}}} and the like
        if _tensor_dict(state):
            break
        inner = next((state[k] for k in _WRAPPERS if isinstance(state, dict) and isinstance(state.get(k), dict)),
                     None)
        if inner is None:
            break
        state = inner
    if not _tensor_dict(state):
        raise LtcliError(f"{path}: holds no state dict of named tensors (looked inside: {', '.join(_WRAPPERS)})")
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_encoder_weights(encoder: nn.Module, path, arch: str, classifier: str | None) -> None:
    """Load a weights file into an encoder whose classifier (module `classifier`) was removed."""
    state = read_state(path)
    if classifier:
        state = {k: v for k, v in state.items() if not (k == classifier or k.startswith(classifier + "."))}
    missing, unexpected = _mismatch(encoder, state)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing, first '{missing[0]}'")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected, first '{unexpected[0]}'")
        raise LtcliError(f"{path}: weights do not fit {arch} ({'; '.join(parts)})")
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # shapes
        first = str(exc).strip().splitlines()
        detail = next((line.strip() for line in first if "size mismatch" in line), first[0] if first else "")
        raise LtcliError(f"{path}: weights do not fit {arch} ({detail[:160]})") from None


def _mismatch(module: nn.Module, state: dict) -> tuple[list[str], list[str]]:
    want = set(module.state_dict())
    missing = sorted(k for k in want if k not in state)
    unexpected = sorted(k for k in state if k not in want)
    return missing, unexpected

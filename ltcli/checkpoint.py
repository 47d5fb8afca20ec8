"""Backbone checkpoints: what train-backbone saves, and how every stage loads it back.

A checkpoint holds only tensors and plain values ({"format", "kind": "ltcli-backbone", "arch",
"num_classes", "feature_dim", "epoch", "config", "dataset_id", "model", "optimizer"}) and is
loaded with weights_only=True, so a file carrying pickled code is refused, never run."""

from __future__ import annotations

import os

import torch

from .errors import LtcliError
from .io import safe_torch_load
from .models import LTNet, build_model

KIND = "ltcli-backbone"
CHECKPOINT_FORMAT = 1


def plain_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights as CPU tensors (unwrapping DDP / torch.compile)."""
    inner = getattr(model, "module", model)
    inner = getattr(inner, "_orig_mod", inner)
    return {k: v.detach().cpu().clone() for k, v in inner.state_dict().items()}


def checkpoint_payload(model, optimizer, epoch: int, *, arch: str, num_classes: int, feature_dim: int,
                       config: dict, dataset_id: str) -> dict:
    return {
        "format": CHECKPOINT_FORMAT,
        "kind": KIND,
        "arch": arch,
        "num_classes": int(num_classes),
        "feature_dim": int(feature_dim),
        "epoch": epoch,
        "config": config,
        "dataset_id": dataset_id,
        "model": plain_state(model),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
    }


def load_backbone(path: str | os.PathLike) -> dict:
    """Load a stage-1 checkpoint (weights_only) and check it is one."""
    ckpt = safe_torch_load(path, "checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("kind") != KIND or "model" not in ckpt:
        raise LtcliError(f"{path}: not an ltcli backbone checkpoint (no 'kind': '{KIND}')")
    for key in ("arch", "num_classes", "feature_dim"):
        if key not in ckpt:
            raise LtcliError(f"{path}: checkpoint lacks '{key}'")
    if not isinstance(ckpt["arch"], str) or not ckpt["arch"]:
        raise LtcliError(f"{path}: checkpoint 'arch' is not a name ({ckpt['arch']!r})")
    for key in ("num_classes", "feature_dim"):
        if isinstance(ckpt[key], bool) or not isinstance(ckpt[key], int) or ckpt[key] < 1:
            raise LtcliError(f"{path}: checkpoint '{key}' is not a positive integer ({ckpt[key]!r})")
    model = ckpt["model"]
    if not isinstance(model, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in model.items()):
        raise LtcliError(f"{path}: checkpoint 'model' is not a state dict of named tensors")
    check_finite_weights(model, path)
    return ckpt


def check_finite_weights(state: dict, path) -> None:
    """A backbone with NaN or inf weights can only produce garbage features: name the tensor."""
    for key, value in state.items():
        if value.is_floating_point() and value.numel() and not bool(torch.isfinite(value).all()):
            raise LtcliError(f"{path}: checkpoint weights contain NaN or inf ('{key}'); the training that made it "
                             "diverged")


def load_weights(model: torch.nn.Module, state: dict, path, what: str) -> None:
    """load_state_dict with the mismatch named in one line ("PATH: weights do not fit WHAT (...)")."""
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise LtcliError(f"{path}: weights do not fit {what} ({first[:160]})") from None


def model_from_checkpoint(ckpt: dict, path) -> LTNet:
    try:
        model = build_model(ckpt["arch"], int(ckpt["num_classes"]))
    except LtcliError as exc:  # the culprit is the checkpoint, not an --arch the user typed
        raise LtcliError(f"{path}: cannot rebuild the checkpoint's network ({exc})") from None
    load_weights(model, ckpt["model"], path, f"arch {ckpt['arch']}")
    return model

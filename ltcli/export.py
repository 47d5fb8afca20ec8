"""A deployable model: backbone + head folded into one module, exported as a torch.export
program (.pt2) or ONNX, with the preprocessing it expects recorded beside it.

The module takes what `ltcli predict` feeds the network before normalising: uint8 images
N x 3 x S x S (RGB, resized and centre-cropped as recorded), or with features_only the N x D
features. It normalises, runs the backbone, rounds the features to the dtype the head was
fitted on (as the cache stored them) and returns the head's N x C scores, so its top-1 is
predict's."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .errors import LtcliError
from .transforms import IMAGENET_MEAN, IMAGENET_STD

FORMATS = ("pt2", "onnx")


class Scorer(nn.Module):
    """features (N x D float) -> scores (N x C); `head` is the head's own scoring module."""

    def __init__(self, head: nn.Module, feature_dtype: torch.dtype):
        super().__init__()
        self.head, self.feature_dtype = head, feature_dtype

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(feats.to(self.feature_dtype).to(torch.float32))


class ImageClassifier(nn.Module):
    """uint8 images -> scores: normalise (the arithmetic of `transforms.normalize_batch`, with
    its constants as buffers), backbone features, the head."""

    def __init__(self, encoder: nn.Module, scorer: Scorer):
        super().__init__()
        self.encoder, self.scorer = encoder, scorer
        self.register_buffer("shift", torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, -1, 1, 1).mul(255.0))
        self.register_buffer("scale", torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, -1, 1, 1).mul(255.0))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.to(torch.float32) - self.shift) / self.scale
        return self.scorer(self.encoder(x).flatten(1))


def build_module(model, head, feature_dtype: torch.dtype, features_only: bool) -> nn.Module:
    scoring = head.scoring_module()
    if scoring is None:
        raise LtcliError(f"--head {head.method}: cannot be exported: it has no fixed scoring function "
                         "(kNN searches the train features at every query); export another head")
    scorer = Scorer(scoring, feature_dtype).eval()
    return scorer if features_only else ImageClassifier(model.encoder, scorer).eval()


def export(module: nn.Module, example: torch.Tensor, path: Path, fmt: str, meta: dict) -> Path:
    """Write `module` as `fmt` to `path` (atomically), with `meta` recorded inside."""
    from .io import atomic_path

    if fmt not in FORMATS:
        raise LtcliError(f"--format {fmt}: choose {' or '.join(FORMATS)}")
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    with torch.no_grad():
        try:
            program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
        except Exception as exc:  # torch.export reports unsupported code in many types
            raise LtcliError(f"--head {meta.get('head')}: torch.export cannot capture the model "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]})") from None
    with atomic_path(path) as tmp:
        if fmt == "pt2":
            torch.export.save(program, tmp, extra_files={"ltcli.json": json.dumps(meta)})
        else:
            _onnx(program, module, example, tmp, meta)
    return path


def _onnx(program, module, example, tmp: Path, meta: dict) -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise LtcliError("--format onnx: needs the onnx extra (pip install 'ltcli[onnx]': onnx, onnxscript, "
                         "onnxruntime)") from None
    onnx_program = torch.onnx.export(program, (example,), dynamo=True, dynamic_shapes=({0: "batch"},))
    model = onnx_program.model_proto
    import onnx

    prop = model.metadata_props.add()
    prop.key, prop.value = "ltcli", json.dumps(meta)
    onnx.save(model, str(tmp))


def load_pt2(path: str | Path):
    """(callable module, metadata) of an exported .pt2, with plain torch."""
    extra = {"ltcli.json": ""}
    program = torch.export.load(str(path), extra_files=extra)
    return program.module(), json.loads(extra["ltcli.json"] or "{}")


def preprocessing(size: int, in_memory: bool) -> dict:
    from .transforms import test_resize

    resize = (f"shorter side resized to {size} (bilinear), centre crop {size}x{size}" if in_memory else
              f"shorter side resized to {test_resize(size)} (bilinear), centre crop {size}x{size}")
    return {"input": f"uint8 N x 3 x {size} x {size}, RGB", "resize": resize, "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD), "normalisation": "inside the model: (x / 255 - mean) / std"}

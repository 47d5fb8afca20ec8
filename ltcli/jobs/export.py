"""`ltcli export`: one self-contained file that maps images (or features) to class scores.

Backbone and head are folded into one module and exported as a torch.export program (.pt2,
loaded with plain `torch.export.load`) or ONNX (`--format onnx`, the onnx extra). The
preprocessing, class names and provenance are recorded inside the file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import LtcliError
from ..export import FORMATS, build_module, export, preprocessing
from ..heads import load_head
from ..inputs import input_size
from ..options import Options, opt
from ..rundir import RunDir, file_sha256
from .common import run_backbone
from .predict import default_head


@dataclass(kw_only=True)
class ExportOptions(Options):
    command = "export"

    head: str | None = opt(None, str, "Head name in RUN/heads or a .pt path (default: as predict chooses).",
                           optional=True)
    checkpoint: Path | None = opt(None, Path, "Backbone checkpoint (default: the run's).", optional=True)
    out: Path | None = opt(None, Path, "Output file (default RUN/exports/HEAD.pt2 or .onnx).", optional=True)
    format: str = opt("pt2", str, "pt2 (torch.export program) or onnx (needs the onnx extra).", choices=FORMATS)
    features_only: bool = opt(False, bool, "Export the head alone: N x D features in, scores out.")


def run(opts: ExportOptions, run_dir: RunDir) -> Path:
    info = run_dir.read()
    name = opts.head or default_head(run_dir)
    head_path = Path(name) if name.endswith(".pt") else run_dir.head(name)
    head, prov = load_head(head_path)
    if list(head.class_names) != list(info["class_names"]):
        raise LtcliError(f"{head_path}: its classes are not {run_dir.run_json}'s (a head of another dataset)")
    feature_dtype = getattr(torch, str(prov.get("feature_dtype") or "float16"), torch.float16)
    meta = {"head": head.method, "head_options": head.options, "class_names": list(head.class_names),
            "feature_dim": head.dim, "feature_dtype": str(feature_dtype).replace("torch.", ""),
            "backbone_sha256": prov.get("backbone_sha256"), "dataset_id": prov.get("dataset_id")}
    if opts.features_only:
        module = build_module(None, head, feature_dtype, features_only=True)
        example = torch.zeros(2, head.dim)
        meta["input"] = f"float32 N x {head.dim} features"
    else:
        model, ckpt_path = run_backbone(run_dir, info, opts.checkpoint)
        if prov.get("backbone_sha256") and prov["backbone_sha256"] != file_sha256(ckpt_path):
            raise LtcliError(f"{head_path} was fitted on features of another backbone than {ckpt_path}")
        size, in_memory = input_size(None, info.get("image_size"))
        module = build_module(model.eval(), head, feature_dtype, features_only=False)
        example = torch.zeros(2, 3, size, size, dtype=torch.uint8)
        meta.update(arch=model.arch, image_size=size, **preprocessing(size, in_memory))
    out = Path(opts.out or run_dir.root / "exports" / f"{head.method}.{opts.format}")
    return export(module, example, out, opts.format, meta)

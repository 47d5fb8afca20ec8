"""`ltcli predict`: label new images with the backbone and a fitted head.

Images go through the same input pipeline as extract (`ltcli.inputs`: size, in memory or
streamed, JPEG draft, autocast, channels_last) and the features are rounded to the dtype the
head was fitted on, so predict's labels are the ones `eval` gets from the cached features.
Inputs are streamed in chunks (a folder walk or stdin never has to fit in memory); an
unreadable image is reported and skipped, and the command exits 2 at the end if any was."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..console import err_console
from ..data import IMAGE_EXTENSIONS, Split
from ..errors import LtcliError
from ..heads import baseline_method, load_head, methods
from ..inputs import forward_features, input_size, open_source, prepare_model, readable
from ..io import stdin_lines
from ..options import Options, opt
from ..rundir import RunDir, file_sha256
from .common import run_backbone
from ..runtime import AMP_HELP, DEVICE_HELP, amp_dtype, resolve_device

CHUNK = 1024  # images decoded, scored and printed at a time


@dataclass(kw_only=True)
class PredictOptions(Options):
    command = "predict"

    inputs: list = opt([], list, "Image files or folders; '-' reads paths from stdin, one per line.", argument=True)
    head: str | None = opt(None, str, "Head name in RUN/heads or a .pt path (default: the best top-1 of the last "
                           "`ltcli eval` on test).", optional=True)
    checkpoint: Path | None = opt(None, Path, "Backbone checkpoint (default RUN/backbone.pt).", optional=True)
    top_k: int = opt(5, int, "How many labels per image.", min=1, max=1_000_000)
    format: str = opt("csv", str, "csv or json (on stdout).", choices=("csv", "json"))
    batch_size: int = opt(256, int, "Images per forward.", min=1, max=1 << 16)
    workers: int = opt(4, int, "Decode worker processes.", min=0, max=256)
    device: str = opt("auto", str, DEVICE_HELP)
    amp: str = opt("auto", str, AMP_HELP)


def _expand(items, max_line: int) -> Iterator[Path]:
    """Image paths, lazily: files as given, folders walked in sorted order, '-' from stdin."""
    for item in items:
        if item == "-":
            yield from _expand(stdin_lines(max_line), max_line)
            continue
        p = Path(item)
        if p.is_dir():
            found = False
            for root, dirs, files in os.walk(p):
                dirs.sort()
                for name in sorted(files):
                    if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                        found = True
                        yield Path(root) / name
            if not found:
                raise LtcliError(f"{p}: no images found")
        elif p.exists() or p.is_symlink():
            yield p
        else:
            raise LtcliError(f"{p}: no such image or folder")


def default_head(run_dir: RunDir) -> str:
    """The head with the best top-1 in the run's last test report; without a report, the first
    fitted head in table order that is not the baseline (or the baseline)."""
    fitted = [m for m in methods() if run_dir.head(m).exists()]
    try:
        heads = json.loads((run_dir.reports / "eval-test.json").read_text())["heads"]
        return max((h for h in heads if run_dir.head(h).exists()), key=lambda h: heads[h]["overall"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    rest = [m for m in fitted if m != baseline_method()] + fitted
    if not rest:
        raise LtcliError(f"--head: none given and {run_dir.heads_dir} holds no fitted head; fit one with "
                         "`ltcli fit-head`")
    return rest[0]


class Predictor:
    """Backbone + head, set up once; `__call__` labels one chunk of image paths."""

    def __init__(self, opts: PredictOptions, run_dir: RunDir):
        info = run_dir.read()
        model, ckpt_path = run_backbone(run_dir, info, opts.checkpoint)
        head_name = opts.head or default_head(run_dir)
        head_path = Path(head_name) if head_name.endswith(".pt") else run_dir.head(head_name)
        self.head, prov = load_head(head_path)
        if prov.get("backbone_sha256") and prov["backbone_sha256"] != file_sha256(ckpt_path):
            raise LtcliError(f"{head_path} was fitted on features of another backbone than {ckpt_path}")
        self.opts, self.device = opts, resolve_device(opts.device)
        self.amp = amp_dtype(opts.amp, self.device)
        self.model = prepare_model(model, self.device)
        self.size, self.in_memory = input_size(None, info.get("image_size"))  # as the run trained
        # the features the head saw were stored in this dtype: round to it, as the cache did
        self.feature_dtype = getattr(torch, str(prov.get("feature_dtype") or "float16"), torch.float16)
        self.names = info["class_names"]
        if list(self.head.class_names) != list(self.names):
            raise LtcliError(f"{head_path}: its {self.head.num_classes} classes are not {run_dir.run_json}'s "
                             f"{len(self.names)} (a head of another dataset)")
        self.k = max(1, min(opts.top_k, len(self.names)))

    def __call__(self, files: list[Path]) -> tuple[list[dict], list[str]]:
        ok, errors = readable(Split("predict", np.zeros(len(files), np.int64), paths=[str(f) for f in files]),
                              self.opts.workers)
        rows: list[dict] = []
        if len(ok):
            good = [files[i] for i in ok]
            split = Split("predict", np.zeros(len(good), dtype=np.int64), paths=[str(f) for f in good])
            source = open_source(split, size=self.size, in_memory=self.in_memory, device=self.device,
                                 workers=self.opts.workers)
            for s, e, xs in source.batches(0, len(good), self.opts.batch_size):
                feats = forward_features(self.model, xs, self.device, self.amp).to(self.feature_dtype)
                probs = torch.softmax(self.head.logits(feats.float().cpu()), dim=1)
                top = probs.topk(self.k, dim=1)
                for f, scores, idx in zip(good[s:e], top.values.tolist(), top.indices.tolist()):
                    rows.append({"path": str(f), "labels": [self.names[i] for i in idx],
                                 "scores": [round(v, 6) for v in scores]})
        return rows, errors


def run(opts: PredictOptions, run_dir: RunDir, emit) -> tuple[int, int, str | None]:
    """Label every image, chunk by chunk, handing each chunk's rows to `emit(rows)`;
    (images labelled, images unreadable, the first unreadable image's message)."""
    if not opts.inputs:
        raise LtcliError("predict: give image files or folders (or '-' to read paths from stdin)")
    for item in opts.inputs:  # a typo is named before the backbone is loaded
        if item != "-" and not (Path(item).exists() or Path(item).is_symlink()):
            raise LtcliError(f"{item}: no such image or folder")
    predictor = Predictor(opts, run_dir)
    done = bad = 0
    first_error = None
    chunk: list[Path] = []
    seen_any = False

    def flush():
        nonlocal done, bad, first_error
        rows, errors = predictor(chunk)
        for message in errors:
            err_console.print(f"ltcli: skipped {message}", highlight=False, markup=False)
        first_error = first_error or (errors[0] if errors else None)
        done, bad = done + len(rows), bad + len(errors)
        emit(rows)
        chunk.clear()

    for path in _expand(opts.inputs, max_line=4096):
        seen_any = True
        chunk.append(path)
        if len(chunk) == CHUNK:
            flush()
    if chunk:
        flush()
    if not seen_any:
        raise LtcliError("-: stdin held no image paths" if opts.inputs == ["-"] else
                         f"{', '.join(opts.inputs)}: no images found")
    return done, bad, first_error

"""Arrays from outside ltcli: .npy, .npz, .pt / .pth and .safetensors files, read without
unpickling anything (np.load(allow_pickle=False), torch weights_only, safetensors)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import LtcliError
from .io import check_regular_file, safe_torch_load

SUFFIXES = (".npy", ".npz", ".pt", ".pth", ".safetensors")


def load_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """name -> array. A .npy (or a .pt holding one tensor) gives {"array": ...}; .npz,
    .safetensors and .pt dicts give their named arrays. Large .npy files are memory-mapped."""
    path = check_regular_file(path, "array file")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise LtcliError(f"{path}: unknown array file type (use {', '.join(SUFFIXES)})")
    try:
        if suffix == ".npy":
            return {"array": np.load(path, mmap_mode="r", allow_pickle=False)}
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        if suffix == ".safetensors":
            from safetensors.numpy import load_file

            return dict(load_file(str(path)))
    except ValueError as exc:
        if any(s in str(exc) for s in ("allow_pickle", "Object arrays", "Python objects")):
            raise LtcliError(f"{path}: holds an object (ragged or pickled) array; expected numeric arrays") from None
        raise LtcliError(f"{path}: not a valid {suffix} file ({str(exc).splitlines()[0][:120]})") from None
    except (OSError, EOFError, KeyError) as exc:
        raise LtcliError(f"{path}: not a valid {suffix} file ({str(exc).splitlines()[0][:120]})") from None
    except Exception as exc:  # safetensors' own errors
        raise LtcliError(f"{path}: not a valid {suffix} file ({type(exc).__name__})") from None
    obj = safe_torch_load(path, "array file")
    import torch

    if isinstance(obj, torch.Tensor):
        return {"array": obj.detach().cpu().numpy()}
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {str(k): v.detach().cpu().numpy() for k, v in obj.items()}
    raise LtcliError(f"{path}: holds a {type(obj).__name__}, expected a tensor or a dict of tensors")


def pick(arrays: dict[str, np.ndarray], path, names: tuple[str, ...], what: str, required: bool = True):
    """The array stored under one of `names` (or the only array of the file)."""
    for n in names:
        if n in arrays:
            return arrays[n]
    if len(arrays) == 1 and "array" in arrays:
        return arrays["array"]
    if required:
        raise LtcliError(f"{path}: no {what} array (looked for {', '.join(names)}; the file holds "
                         f"{', '.join(sorted(arrays)) or 'nothing'})")
    return None


def numeric(arr, path, what: str, ndims: tuple[int, ...]) -> np.ndarray:
    arr = np.asarray(arr) if not isinstance(arr, np.memmap) else arr
    if arr.dtype.kind not in "fiub":
        raise LtcliError(f"{path}: {what} hold {arr.dtype}, expected numbers")
    if arr.ndim not in ndims:
        want = " or ".join({1: "N", 2: "N x D", 3: "N x K x D"}.get(d, f"{d}-D") for d in ndims)
        raise LtcliError(f"{path}: {what} have shape {tuple(arr.shape)}, expected {want}")
    return arr


def integer_labels(arr, path, n: int) -> np.ndarray:
    arr = numeric(arr, path, "labels", (1,))
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise LtcliError(f"{path}: labels are not integers")
    labels = np.asarray(arr, dtype=np.int64)
    if len(labels) != n:
        raise LtcliError(f"{path}: {len(labels)} labels for {n} feature rows")
    if len(labels) and labels.min() < 0:
        raise LtcliError(f"{path}: label {int(labels.min())} is negative (row {int(np.argmin(labels))})")
    return labels


def first_non_finite_row(arr: np.ndarray, block_rows: int = 1 << 14) -> int | None:
    """Index of the first row holding NaN or inf, checked in blocks (a memory map stays lazy)."""
    n = arr.shape[0]
    for s in range(0, n, block_rows):
        block = np.asarray(arr[s : s + block_rows], dtype=np.float32).reshape(min(block_rows, n - s), -1)
        bad = ~np.isfinite(block).all(axis=1)
        if bad.any():
            return s + int(np.flatnonzero(bad)[0])
    return None


def read_names(path) -> list[str]:
    """Class names: a text file (one per line) or a JSON list."""
    import json

    path = check_regular_file(path, "class names file")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LtcliError(f"{path}: cannot read class names ({exc})") from None
    if text.lstrip().startswith("["):
        try:
            names = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LtcliError(f"{path}: not valid JSON ({exc})") from None
    else:
        names = [line.strip() for line in text.splitlines()]
        while names and not names[-1]:
            names.pop()
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise LtcliError(f"{path}: expected one non-empty class name per line (or a JSON list of names)")
    return names

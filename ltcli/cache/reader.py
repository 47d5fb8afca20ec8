"""Reading the feature cache: attributes, and whole files as FeatureSets."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import LtcliError
from ..featureset import FeatureSet
from .schema import PROVENANCE, READ_ROWS_BYTES, attrs_of, check_stored_size, datasets_of, h5_reason, open_h5


def read_attrs(path: str | os.PathLike) -> dict[str, Any]:
    """The attributes of a features file (complete or not), validated; adds `path`."""
    path = Path(path)
    with open_h5(path) as f:
        attrs = attrs_of(f, path)
    attrs["path"] = str(path)
    return attrs



def _mmap_rows(f, dset, n: int):
    """A copy-on-write memory map of /features when its chunks lie in order, back to back."""
    try:
        dsid = dset.id
        plist = dsid.get_create_plist()
        if plist.get_nfilters():
            return None
        chunks = dset.chunks
        if chunks is None:
            offset = dsid.get_offset()
            if offset is None:
                return None
            return np.memmap(f.filename, dtype=dset.dtype, mode="c", offset=offset, shape=dset.shape)
        rows = chunks[0]
        if tuple(chunks[1:]) != tuple(dset.shape[1:]):
            return None
        nchunks = dsid.get_num_chunks()
        if nchunks != -(-n // rows):
            return None
        chunk_bytes = int(np.prod(chunks)) * dset.dtype.itemsize
        base = None
        for i in range(nchunks):
            info_i = dsid.get_chunk_info(i)
            if info_i.chunk_offset[0] != i * rows or info_i.size != chunk_bytes:
                return None
            if base is None:
                base = info_i.byte_offset
            elif info_i.byte_offset != base + i * chunk_bytes:
                return None
        if base is None:
            return None
        arr = np.memmap(
            f.filename, dtype=dset.dtype, mode="c", offset=base, shape=(nchunks * rows, *chunks[1:])
        )
        return arr[:n]
    except (AttributeError, OSError, ValueError, RuntimeError):
        return None


def read_features(path: str | os.PathLike, *, mmap: bool = False) -> FeatureSet:
    """Load a complete features file as a FeatureSet (features float32, N x D or N x K x D).

    With mmap=True the features are a copy-on-write memory map of the file in the stored
    dtype (float16 by default) instead, so a large file is paged in as it is used.
    Refuses (LtcliError) missing, non-HDF5, truncated, corrupt, incomplete, shard and
    newer-format files."""
    path = Path(path)
    with open_h5(path) as f:
        attrs = attrs_of(f, path)
        if not attrs["complete"]:
            raise LtcliError(
                f"{path}: incomplete feature cache (extraction did not finish; rerun "
                "`ltcli extract` to resume)"
            )
        if "shard_rank" in attrs:
            raise LtcliError(
                f"{path}: is shard {attrs['shard_rank']} of {attrs.get('shard_world')} of a "
                "distributed extraction; read the merged file"
            )
        feats, labels_ds, index_ds = datasets_of(f, path, attrs)
        n = feats.shape[0]
        check_stored_size(f, feats, path)
        if attrs.get("rows_done", n) != n:
            raise LtcliError(f"{path}: corrupt features file (complete, but rows_done is {attrs['rows_done']} of {n})")
        try:
            labels = torch.from_numpy(np.asarray(labels_ds[()], dtype=np.int64))
            index = torch.from_numpy(np.asarray(index_ds[()], dtype=np.int64))
            features = None
            if mmap:
                arr = _mmap_rows(f, feats, n)
                if arr is not None:
                    features = torch.from_numpy(arr)
            if features is None:
                out_dtype = np.dtype(feats.dtype) if mmap else np.dtype(np.float32)
                out = np.empty(feats.shape, dtype=out_dtype)
                row_bytes = max(1, int(np.prod(feats.shape[1:])) * 4)
                step = max(1, READ_ROWS_BYTES // row_bytes)
                for s in range(0, n, step):
                    e = min(n, s + step)
                    out[s:e] = feats[s:e]
                features = torch.from_numpy(out)
            weight = bias = None
            if "classifier" in f:
                g = f["classifier"]
                if "weight" in g:
                    weight = torch.from_numpy(np.asarray(g["weight"][()], dtype=np.float32))
                if "bias" in g:
                    bias = torch.from_numpy(np.asarray(g["bias"][()], dtype=np.float32))
        except (OSError, KeyError, ValueError, RuntimeError) as exc:  # damaged data or metadata
            raise LtcliError(
                f"{path}: corrupt or truncated features file ({h5_reason(exc)})"
            ) from None
        dtype = str(np.dtype(feats.dtype))
    c = len(attrs["class_names"])
    if n and (int(labels.min()) < 0 or int(labels.max()) >= c):
        raise LtcliError(f"{path}: corrupt features file (labels outside 0..{c - 1})")
    if weight is not None and (weight.ndim != 2 or weight.shape[0] != c or weight.shape[1] != features.shape[-1]):
        raise LtcliError(
            f"{path}: corrupt features file (/classifier/weight is {tuple(weight.shape)}, "
            f"expected {c} x {features.shape[-1]})"
        )
    prov = {k: attrs[k] for k in PROVENANCE if k in attrs}
    prov.update(path=str(path), dtype=dtype, index=index, rows_sha256=attrs.get("rows_sha256"))
    return FeatureSet(
        features=features,
        labels=labels,
        weight=weight,
        bias=bias,
        class_names=list(attrs["class_names"]),
        train_counts=torch.tensor(attrs["train_class_counts"], dtype=torch.int64),
        split=str(attrs["split"]),
        attrs=prov,
    )

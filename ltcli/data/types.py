"""The data model every stage consumes: DataConfig in, Dataset of Splits out."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from ..errors import LtcliError


@dataclass
class DataConfig:
    spec: str = "synthetic"
    seed: int = 0
    imbalance_factor: float | None = None   # None/1 = keep counts as found; IF >= 1
    val_per_class: int = 0                  # balanced val held out of train BEFORE subsampling
    skip_bad_images: bool = False
    allow_outside_root: bool = False        # list-file paths may not escape ROOT otherwise
    # synthetic generator
    num_classes: int = 10
    image_size: int = 32
    synthetic_max_per_class: int = 500      # n_max of the synthetic train split
    synthetic_imbalance: float = 100.0      # IF used by `synthetic` when --imbalance-factor not given
    synthetic_test_per_class: int = 100
    synthetic_val_per_class: int = 20


class Split:
    """One split's images and labels, either file-backed (`paths`) or in memory (`images`).

    `keys` identify the images independently of where the data lives: the path relative
    to the data root for files, `#<index in the source>` for in-memory images. Selection
    (val hold-out, long-tail subsampling) and the fingerprint of file-backed data use them."""

    def __init__(
        self,
        name: str,
        labels: np.ndarray,
        *,
        paths: list[str] | None = None,
        images: np.ndarray | None = None,
        keys: list[str] | None = None,
    ) -> None:
        if (paths is None) == (images is None):
            raise ValueError("a Split holds either paths or images")
        self.name = name
        self.labels = np.asarray(labels, dtype=np.int64)
        self.paths = paths
        self.images = images
        n = len(self.labels)
        if keys is None:
            keys = [f"#{i}" for i in range(n)]
        self.keys = keys
        if len(keys) != n or (paths is not None and len(paths) != n) or (
            images is not None and len(images) != n
        ):
            raise ValueError("labels, keys and paths/images must have one entry per image")
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        kind = "files" if self.paths is not None else "in-memory"
        return f"Split({self.name!r}, {len(self)} images, {kind})"

    def load(self, i: int, draft: int | None = None) -> Image.Image:
        """Image i as RGB; a missing, unreadable or corrupt file is an LtcliError naming it.

        draft=S: a JPEG at least twice S on both sides is decoded at 1/2, 1/4 or 1/8 scale
        (libjpeg's DCT scaling), never below S x S: several times faster for big photos that
        are about to be shrunk to S anyway."""
        if self.images is not None:
            return Image.fromarray(self.images[i])
        path = self.paths[i]
        try:
            with Image.open(path) as img:
                if draft:
                    img.draft("RGB", (draft, draft))  # no-op for other formats and small JPEGs
                img.load()  # decode now: truncated files only fail here
                return img.convert("RGB")
        except FileNotFoundError:
            raise LtcliError(f"{path}: image not found") from None
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise LtcliError(f"{path}: cannot read image ({reason[:120]})") from None

    def subset(self, indices, name: str | None = None) -> Split:
        """A new Split holding the given positions (in that order), optionally renamed."""
        idx = np.asarray(indices, dtype=np.int64)
        return Split(
            name or self.name,
            self.labels[idx],
            paths=None if self.paths is None else [self.paths[i] for i in idx],
            images=None if self.images is None else self.images[idx],
            keys=[self.keys[i] for i in idx],
        )

    def fingerprint(self) -> str:
        """sha256 hex of the ordered (relative path | content hash, label) list."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for i in range(len(self)):
                if self.images is not None:
                    ident = hashlib.sha256(np.ascontiguousarray(self.images[i]).tobytes()).hexdigest()
                else:
                    ident = self.keys[i]
                h.update(f"{ident}\t{int(self.labels[i])}\n".encode())
            self._fingerprint = h.hexdigest()
        return self._fingerprint


@dataclass
class Dataset:
    spec: str
    class_names: list[str]
    splits: dict[str, Split]       # always "train"; "val"/"test" where the data has them
    train_counts: list[int]        # per class, after subsampling
    native_size: int | None        # known image side (32 for cifar/synthetic), None if unknown
    skipped: list[str] = field(default_factory=list)   # files skipped with --skip-bad-images
    warnings: list[str] = field(default_factory=list)  # e.g. classes short of their target count

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split(self, name: str) -> Split:
        if name not in self.splits:
            have = ", ".join(self.splits)
            raise LtcliError(f"--split {name}: data '{self.spec}' has no {name} split (has: {have})")
        return self.splits[name]

    def restrict(self, name: str, kept) -> list[str]:
        """Keep only positions `kept` of split `name` (e.g. decode_split's kept indices).

        The dropped images are added to `skipped` (and returned); train_counts follow."""
        split = self.split(name)
        kept = np.asarray(kept, dtype=np.int64)
        mask = np.ones(len(split), dtype=bool)
        mask[kept] = False
        dropped = [
            split.paths[i] if split.paths is not None else f"{name}{split.keys[i]}"
            for i in np.flatnonzero(mask)
        ]
        if dropped:
            self.splits[name] = split.subset(kept)
            self.skipped.extend(dropped)
            if name == "train":
                self.train_counts = np.bincount(
                    self.splits[name].labels, minlength=self.num_classes
                ).tolist()
        return dropped

    def fingerprint(self) -> str:
        """sha256 over every split's fingerprint (what run.json records for the whole data)."""
        h = hashlib.sha256()
        for name in sorted(self.splits):
            h.update(f"{name}:{self.splits[name].fingerprint()}\n".encode())
        return h.hexdigest()

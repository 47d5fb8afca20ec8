"""The data model every stage consumes: DataConfig in, Dataset of Splits out."""

from __future__ import annotations

import hashlib
import os
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
    verify: bool = False                    # fingerprint file contents (sha256), not only size and mtime
    # synthetic generator
    num_classes: int = 10
    image_size: int = 32
    synthetic_max_per_class: int = 500      # n_max of the synthetic train split
    synthetic_imbalance: float = 100.0      # IF used by `synthetic` when --imbalance-factor not given
    synthetic_test_per_class: int = 100
    synthetic_val_per_class: int = 20


MAX_PIXELS = 100_000_000  # 100 MP: a bigger image is more likely a bomb than a photo to classify
MAX_ASPECT = 100  # a 1 x 50,000 strip resized to a 32 px short side would be 1.6 M px wide
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_WITH_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")
_PLAIN = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr")


def _file_identity(path: str, content: bool) -> str:
    """size:mtime_ns of a file, or the sha256 of its bytes; 'missing' when it cannot be read."""
    try:
        if content:
            h = hashlib.sha256()
            with open(path, "rb") as fh:
                while block := fh.read(1 << 20):
                    h.update(block)
            return h.hexdigest()
        st = os.stat(path)
        return f"{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        return "missing"


def check_image_file(path: str) -> None:
    """A regular file (a FIFO named like an image would block the decoder forever)."""
    import stat

    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise LtcliError(f"{path}: image not found") from None
    except OSError as exc:
        raise LtcliError(f"{path}: cannot read image ({exc.strerror or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        raise LtcliError(f"{path}: cannot read image (not a regular file)")


def check_image_size(path: str, size: tuple[int, int]) -> None:
    w, h = size
    if w < 1 or h < 1:
        raise LtcliError(f"{path}: cannot read image (it is {w}x{h} px)")
    if w * h > MAX_PIXELS:
        raise LtcliError(f"{path}: cannot read image ({w}x{h} px is above the {MAX_PIXELS // 10**6} MP limit)")
    if max(w, h) > MAX_ASPECT * min(w, h):
        raise LtcliError(f"{path}: cannot read image ({w}x{h} px: aspect ratio beyond {MAX_ASPECT}:1)")


def to_rgb(img: Image.Image, path: str = "image") -> Image.Image:
    """Any supported mode to 8-bit RGB: 16-bit grey scaled (not clipped) to 8 bits, alpha
    composited over white, palette and CMYK converted; other modes are refused by name."""
    mode = img.mode
    if mode in _SIXTEEN_BIT:
        a = np.asarray(img, dtype=np.float64)
        if a.max(initial=0) > 65535 or a.min(initial=0) < 0:
            raise LtcliError(f"{path}: cannot read image (mode {mode} values outside 0..65535)")
        grey = np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in _WITH_ALPHA:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode in _PLAIN:
        return img.convert("RGB")
    raise LtcliError(f"{path}: cannot read image (unsupported mode {mode}; use 8- or 16-bit grey, RGB, "
                     "RGBA, palette or CMYK)")


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
        self.verify = False  # set by the loader from DataConfig.verify

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        kind = "files" if self.paths is not None else "in-memory"
        return f"Split({self.name!r}, {len(self)} images, {kind})"

    def load(self, i: int, draft: int | None = None) -> Image.Image:
        """Image i as 8-bit RGB; a missing, unreadable, corrupt or unsupported file is an
        LtcliError naming it (see `to_rgb` for how modes are converted).

        draft=S: a JPEG at least twice S on both sides is decoded at 1/2, 1/4 or 1/8 scale
        (libjpeg's DCT scaling), never below S x S: several times faster for big photos that
        are about to be shrunk to S anyway."""
        if self.images is not None:
            return Image.fromarray(self.images[i])
        path = self.paths[i]
        check_image_file(path)
        try:
            with Image.open(path) as img:
                check_image_size(path, img.size)
                if draft:
                    img.draft("RGB", (draft, draft))  # no-op for other formats and small JPEGs
                img.load()  # decode now: truncated files only fail here
                return to_rgb(img, path)
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
        ).verified(self.verify)

    def verified(self, verify: bool) -> "Split":
        self.verify = bool(verify)
        self._fingerprint = None
        return self

    def fingerprint(self) -> str:
        """sha256 hex of the ordered (image identity, label) list. In-memory images are
        identified by their pixels; files by relative path, size and modification time (so an
        image replaced under the same name changes it), or by their bytes with `verify`."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for i in range(len(self)):
                if self.images is not None:
                    ident = hashlib.sha256(np.ascontiguousarray(self.images[i]).tobytes()).hexdigest()
                else:
                    ident = f"{self.keys[i]}\t{_file_identity(self.paths[i], self.verify)}"
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

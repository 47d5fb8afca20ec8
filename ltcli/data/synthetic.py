"""The `synthetic` data kind: a generated long-tailed image set, deterministic per seed.

Each class is a combination of shared visual factors: a coloured grating (orientation,
spatial frequency, hue), a second fainter grating, and a coloured blob (hue, size,
position). Every factor level is shared by several classes, so features learned on the
frequent classes also describe the rare ones; a jointly trained classifier still favours
the frequent classes, which is the gap classifier re-balancing (cRT, tau-norm) closes.
Per image: random phase, translation, mirror, factor jitter, contrast, a random clutter
grating and pixel noise make neighbouring classes overlap moderately."""

from __future__ import annotations

import numpy as np

SPLIT_CODES = {"train": 1, "val": 2, "test": 3}

# per-image variation (fractions of the image side / radians / hue turns)
_SHIFT = 0.12          # blob translation
_THETA_JITTER = 0.12   # grating orientation, radians
_FREQ_JITTER = 0.10    # log-frequency
_HUE_JITTER = 0.035
_CLUTTER = 0.35        # amplitude of the random clutter grating
_NOISE = 0.10          # pixel noise std (image in [0, 1])


def _hue_rgb(h: np.ndarray, sat: float = 0.9) -> np.ndarray:
    """Hue in turns -> RGB in [0, 1] (HSV with value 1), shape (..., 3)."""
    k = (np.asarray(h)[..., None] * 6.0 + np.array([5.0, 3.0, 1.0])) % 6.0
    return 1.0 - sat * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def class_factors(num_classes: int, seed: int) -> dict[str, np.ndarray]:
    """Each class's factor levels: each factor takes a few shared, evenly spaced levels,
    assigned through independent permutations so classes differ in several factors."""
    rng = np.random.default_rng([seed, 0x5EED])

    def levels(n_levels: int, lo: float, hi: float, wrap: bool = False) -> np.ndarray:
        grid = np.linspace(lo, hi, n_levels, endpoint=not wrap)
        reps = np.tile(grid, -(-num_classes // n_levels))[:num_classes]
        return rng.permutation(reps)

    return {
        "theta": levels(4, 0.0, np.pi / 2),          # mirror-symmetric: [0, pi/2]
        "freq": levels(3, 1.5, 4.0),                 # cycles per image
        "hue": levels(6, 0.0, 1.0, wrap=True),
        "theta2": levels(3, 0.0, np.pi / 2),
        "hue2": levels(5, 0.0, 1.0, wrap=True),
        "blob_hue": levels(6, 0.0, 1.0, wrap=True) + 1 / 12,
        "blob_r": levels(2, 0.12, 0.22),
        "blob_x": levels(2, 0.15, 0.32),             # distance from the vertical mid-line
        "blob_y": levels(3, 0.3, 0.7),
    }


def _grating(xx, yy, theta, freq, phase):
    """sin gratings, one per image: (n, S, S)."""
    t = theta[:, None, None]
    proj = xx * np.cos(t) + yy * np.sin(t)
    return np.sin(2 * np.pi * freq[:, None, None] * proj + phase[:, None, None])


def generate_class(factors: dict, c: int, n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """n images of class c: (n, size, size, 3) uint8."""
    if n == 0:
        return np.zeros((0, size, size, 3), np.uint8)
    f = {k: v[c] for k, v in factors.items()}
    ax = (np.arange(size, dtype=np.float32) + 0.5) / size
    yy, xx = np.meshgrid(ax, ax, indexing="ij")
    ones = np.ones(n)

    # main grating: the class's orientation / frequency / hue, jittered per image
    theta = f["theta"] + rng.normal(0, _THETA_JITTER, n)
    freq = f["freq"] * np.exp(rng.normal(0, _FREQ_JITTER, n))
    g1 = _grating(xx, yy, theta, freq, rng.uniform(0, 2 * np.pi, n))
    c1 = _hue_rgb(f["hue"] + rng.normal(0, _HUE_JITTER, n))
    # second, fainter grating
    g2 = _grating(xx, yy, f["theta2"] + rng.normal(0, _THETA_JITTER, n) + np.pi / 3,
                  2.5 * ones * np.exp(rng.normal(0, _FREQ_JITTER, n)), rng.uniform(0, 2 * np.pi, n))
    c2 = _hue_rgb(f["hue2"] + rng.normal(0, _HUE_JITTER, n))
    # blob at the class's position, translated per image
    bx = 0.5 + f["blob_x"] + rng.uniform(-_SHIFT, _SHIFT, n)
    by = f["blob_y"] + rng.uniform(-_SHIFT, _SHIFT, n)
    r = f["blob_r"] * np.exp(rng.normal(0, 0.1, n))
    blob = np.exp(-((xx - bx[:, None, None]) ** 2 + (yy - by[:, None, None]) ** 2) / (2 * r[:, None, None] ** 2))
    cb = _hue_rgb(f["blob_hue"] + rng.normal(0, _HUE_JITTER, n))
    # clutter: a random grating of random colour, shared by no class
    g3 = _grating(xx, yy, rng.uniform(0, np.pi, n), rng.uniform(1.0, 5.0, n), rng.uniform(0, 2 * np.pi, n))
    c3 = _hue_rgb(rng.uniform(0, 1, n), sat=0.6)

    contrast = rng.uniform(0.5, 1.0, n)[:, None, None, None]
    background = 0.5 + rng.normal(0, 0.08, (n, 1, 1, 3))
    img = (
        0.22 * g1[..., None] * (c1[:, None, None, :] - 0.3)
        + 0.12 * g2[..., None] * (c2[:, None, None, :] - 0.3)
        + 0.55 * blob[..., None] * (cb[:, None, None, :] - 0.5)
        + _CLUTTER * 0.5 * g3[..., None] * (c3[:, None, None, :] - 0.3)
    )
    img = background + contrast * img + rng.normal(0, _NOISE, img.shape)
    # random mirror: class identity is flip-invariant, so flip augmentation is label-safe
    flip = rng.random(n) < 0.5
    img[flip] = img[flip, :, ::-1]
    return (np.clip(img, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


def generate_split(
    counts: list[int], size: int, seed: int, split: str, factors: dict
) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, size, size, 3) uint8 and labels, class by class; each (seed, split, class)
    has its own random stream, so one class's count never changes another's images."""
    images, labels = [], []
    for c, n in enumerate(counts):
        rng = np.random.default_rng([seed, SPLIT_CODES[split], c])
        images.append(generate_class(factors, c, n, size, rng))
        labels.append(np.full(n, c, dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)

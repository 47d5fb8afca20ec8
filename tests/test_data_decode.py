"""decode_split (in-memory and files, parallel, resize, bad images) and SplitDataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ltcli.data import DataConfig, Split, SplitDataset, collate_skip, decode_split, load_dataset
from ltcli.errors import LtcliError


def write_folder(root: Path, n_per_class: int = 5, size: int = 8) -> dict[str, np.ndarray]:
    """PNG imagefolder; returns the pixel arrays by relative key."""
    pixels = {}
    for c in ("a", "b"):
        for i in range(n_per_class):
            arr = np.random.default_rng([ord(c), i]).integers(0, 256, (size, size, 3), dtype=np.uint8)
            path = root / "train" / c / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(path)
            pixels[f"{c}/{i}.png"] = arr
    return pixels


@pytest.mark.parametrize("workers", [0, 2])
def test_decode_files_exact_pixels(tmp_path, workers):
    pixels = write_folder(tmp_path / "d", n_per_class=40)
    split = load_dataset(DataConfig(spec=f"imagefolder:{tmp_path / 'd'}")).split("train")
    x, kept = decode_split(split, None, False, workers)
    assert x.dtype == torch.uint8 and tuple(x.shape) == (80, 3, 8, 8) and x.is_contiguous()
    assert kept.tolist() == list(range(80))
    for i in (0, 39, 79):
        assert np.array_equal(x[i].permute(1, 2, 0).numpy(), pixels[split.keys[i]])


def test_decode_resizes_and_crops(tmp_path):
    path = tmp_path / "wide.png"
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, 10:30] = 200  # the centre square is bright, the sides dark
    Image.fromarray(arr).save(path)
    split = Split("test", np.array([0, 0]), paths=[str(path), str(path)], keys=["w", "w2"])
    progress = []
    x, kept = decode_split(split, 10, False, 0, progress=progress.append)
    assert tuple(x.shape) == (2, 3, 10, 10) and progress[-1] == 2
    assert x[0].float().mean() > 180  # shorter side to 10, centre crop keeps the bright part
    x, _ = decode_split(split, None, False, 0)
    assert tuple(x.shape[2:]) == (20, 20)


def test_decode_bad_image_raises_or_is_skipped(tmp_path):
    write_folder(tmp_path / "d", n_per_class=6)
    bad = tmp_path / "d" / "train" / "b" / "2.png"
    bad.write_bytes(b"not a png at all")
    ds = load_dataset(DataConfig(spec=f"imagefolder:{tmp_path / 'd'}"))
    split = ds.split("train")
    bad_index = split.paths.index(str(bad))
    for workers in (0, 2):
        with pytest.raises(LtcliError, match=rf"^{bad}: cannot read image"):
            decode_split(split, 8, False, workers)
    x, kept = decode_split(split, 8, True, 2)
    assert len(x) == 11 and bad_index not in kept and len(kept) == 11
    # the caller records the skipped file; train counts follow
    dropped = ds.restrict("train", kept)
    assert dropped == [str(bad)] and ds.skipped == [str(bad)]
    assert ds.train_counts == [6, 5] and len(ds.split("train")) == 11


def test_decode_in_memory_and_resize():
    images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    split = Split("train", np.arange(4), images=images)
    x, kept = decode_split(split, None, False, 0)
    assert np.array_equal(x.permute(0, 2, 3, 1).numpy(), images) and kept.tolist() == [0, 1, 2, 3]
    flat = np.full((2, 16, 16, 3), 77, np.uint8)
    y, _ = decode_split(Split("train", np.zeros(2), images=flat), 8, False, 0)
    assert tuple(y.shape) == (2, 3, 8, 8) and (y == 77).all()


def test_split_dataset_for_large_images(tmp_path):
    write_folder(tmp_path / "d", n_per_class=2)
    (tmp_path / "d" / "train" / "a" / "1.png").write_bytes(b"junk")
    split = load_dataset(DataConfig(spec=f"imagefolder:{tmp_path / 'd'}")).split("train")
    to_tensor = lambda im: torch.from_numpy(np.array(im)).permute(2, 0, 1)  # noqa: E731
    with pytest.raises(LtcliError, match=r"1\.png: cannot read image"):
        SplitDataset(split, to_tensor)[1]
    loader = torch.utils.data.DataLoader(SplitDataset(split, to_tensor, skip_bad=True),
                                         batch_size=4, collate_fn=collate_skip)
    x, y, idx, bad = next(iter(loader))
    assert tuple(x.shape) == (3, 3, 8, 8) and idx.tolist() == [0, 2, 3] and y.tolist() == [0, 1, 1]
    assert bad == [split.paths[1]]


def test_draft_decodes_big_jpegs_at_reduced_scale_never_below_the_side(tmp_path):
    rng = np.random.default_rng(3)
    small = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    big = tmp_path / "big.jpg"
    Image.fromarray(small).resize((600, 400), Image.BILINEAR).save(big, quality=95)
    png = tmp_path / "big.png"
    Image.fromarray(small).resize((600, 400), Image.BILINEAR).save(png)
    split = Split("test", np.zeros(2), paths=[str(big), str(png)], keys=["big.jpg", "big.png"])
    assert split.load(0).size == (600, 400)
    assert split.load(0, draft=90).size == (150, 100)    # 1/4: 1/8 would make the short side 50 < 90
    assert split.load(0, draft=300).size == (600, 400)   # not twice the side: full scale
    assert split.load(1, draft=90).size == (600, 400)    # PNG: no DCT scaling
    # the reduced decode is a faithful downscale: close to decoding in full and resizing
    full = np.asarray(split.load(0).resize((150, 100), Image.BILINEAR), dtype=np.float32)
    drafted = np.asarray(split.load(0, draft=90), dtype=np.float32)
    assert np.abs(full - drafted).mean() < 4.0

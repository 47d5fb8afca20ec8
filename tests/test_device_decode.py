"""The --gpu-decode pipeline (pack file bytes, batched decode, grouped resize + crop), run on
the CPU: torchvision's decoders take the same code path there, minus the CUDA side stream."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from ltcli.device_decode import DeviceDecoder, cpu_fallback, pack_bytes, resize_crop, unpack_bytes
from ltcli.errors import LtcliError
from torchvision import transforms as T

CPU = torch.device("cpu")


def _photo(seed: int, w: int, h: int) -> Image.Image:
    """Smooth random content (like a photo), so JPEG round trips stay close."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(1, h // 8), max(1, w // 8), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.BILINEAR)


def _encode(img: Image.Image, fmt: str = "JPEG") -> torch.Tensor:
    buf = io.BytesIO()
    img.save(buf, format=fmt, quality=95)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def test_pack_and_unpack_round_trip():
    blobs = [torch.arange(n, dtype=torch.uint8) for n in (3, 0, 7, 1)]
    flat, lengths = pack_bytes(blobs)
    assert flat.shape == (11,) and lengths.tolist() == [3, 0, 7, 1]
    back = unpack_bytes(flat, lengths)
    assert [b.tolist() for b in back] == [b.tolist() for b in blobs]
    assert all(b.is_contiguous() for b in back)


def test_grouped_resize_equals_one_image_at_a_time():
    rng = np.random.default_rng(1)
    shapes = [(30, 40), (40, 30), (30, 40), (25, 25), (30, 40)]
    images = [torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8)) for h, w in shapes]
    batch = resize_crop(images, 16, 18, torch.empty(5, 3, 16, 16, dtype=torch.uint8))
    for i, img in enumerate(images):
        one = resize_crop([img], 16, 18, torch.empty(1, 3, 16, 16, dtype=torch.uint8))
        assert torch.equal(batch[i], one[0])


def test_decoder_matches_the_pil_test_transform():
    """JPEG and PNG (the fallback) both come out close to PIL's Resize + CenterCrop."""
    imgs = [_photo(i, w, h) for i, (w, h) in enumerate([(64, 48), (48, 64), (64, 48), (40, 40)])]
    datas = [_encode(im, "JPEG" if i != 3 else "PNG") for i, im in enumerate(imgs)]
    decoder = DeviceDecoder(CPU, size=32, resize=37)  # as extract: resize = round(size * 256 / 224)
    out = decoder(datas, cpu_fallback(lambda i: imgs[i]))
    assert out.shape == (4, 3, 32, 32) and out.dtype == torch.uint8
    ref_tf = T.Compose([T.Resize(37), T.CenterCrop(32), T.PILToTensor()])  # test_transform(32), unnormalised
    for i, im in enumerate(imgs):
        ref = ref_tf(Image.open(io.BytesIO(datas[i].numpy().tobytes())).convert("RGB")).float()
        diff = (out[i].float() - ref).abs()
        assert diff.mean() < 2.0, (i, diff.mean())


def test_undecodable_bytes_reach_the_fallback_error():
    good = _encode(_photo(0, 20, 20))
    bad = torch.frombuffer(bytearray(b"\xff\xd8\xff" + b"\x00" * 40), dtype=torch.uint8)

    def load(i):
        raise LtcliError(f"img{i}.jpg: cannot read image")

    with pytest.raises(LtcliError, match="img1.jpg"):
        DeviceDecoder(CPU, 16, 18)([good, bad], cpu_fallback(load))

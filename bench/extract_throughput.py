"""Throughput of `ltcli extract` against its two ceilings, measured in one run.

  forward ceiling  the model's forward (features) on in-memory tensors already on the device
  loader ceiling   decoding the split's images alone (CPU decode into memory for small
                   images; file reading + GPU JPEG decoding for large ones with --gpu-decode)
  extract          ltcli's extract_split end to end (decode, forward, HDF5 write)

For the 224 px case both decoders are measured (CPU workers with the PIL test transform, and
--gpu-decode on CUDA), and on CUDA the GPU decoder is also profiled on file bytes already in
memory: nvJPEG batched decode alone, and decode + grouped resize + crop (DeviceDecoder), so a
slow row says whether the decoder, the resize or the file loader is the limit.

Target (issue 3): extract >= 85 % of min(forward, loader), for resnet32 on CIFAR-10 (32 px)
and resnet50 at 224 px with GPU decoding.

    python bench/extract_throughput.py --cifar-root PATH [--jpegs 4000] --out bench/extract.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def forward_ceiling(model, n, size, batch, device, amp) -> float:
    x = torch.randn(batch, 3, size, size, device=device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    dtype = torch.bfloat16 if amp else None
    steps = max(3, n // batch)
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        for _ in range(3):
            model.features(x)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            model.features(x)
        _sync(device)
    return steps * batch / (time.perf_counter() - t0)


def make_jpegs(root: Path, n: int, classes: int = 10, size=(500, 375)) -> None:
    """ImageNet-sized JPEGs (smooth random content so they compress like photos)."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    def one(i):
        rng = np.random.default_rng(i)
        small = rng.integers(0, 255, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize(size, Image.BILINEAR)
        d = root / "train" / f"c{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        img.save(d / f"{i:06d}.jpg", quality=90)

    with ThreadPoolExecutor(os.cpu_count() or 4) as pool:
        list(pool.map(one, range(n)))


def device_decode_profile(paths, size, batch, device) -> dict:
    """images/s of nvJPEG batched decode alone and of DeviceDecoder (decode + resize + crop),
    on file bytes already in memory (no loader)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    from ltcli.device_decode import DeviceDecoder

    datas = [torch.frombuffer(bytearray(Path(p).read_bytes()), dtype=torch.uint8) for p in paths]
    batches = [datas[i : i + batch] for i in range(0, len(datas), batch)]

    def no_fallback(i, d):
        raise RuntimeError(f"image {i} did not decode on the device")

    decoder = DeviceDecoder(device, size, int(round(size * 256 / 224)))
    rates = {}
    for name, fn in (("decode_only", lambda b: decode_jpeg(b, mode=ImageReadMode.RGB, device=device)),
                     ("decode_resize", lambda b: decoder(b, no_fallback))):
        fn(batches[0])  # warm-up: decoder state, allocator
        _sync(device)
        t0 = time.perf_counter()
        for b in batches:
            fn(b)
        _sync(device)
        rates[name] = round(len(datas) / (time.perf_counter() - t0))
    return rates


def bench_case(name, spec, arch, size, batch, device, amp, workers, gpu_decode, out_dir):
    from ltcli.data import DataConfig, decode_split, load_dataset
    from ltcli.extraction import Extraction, extract_split
    from ltcli.models import build_model

    ds = load_dataset(DataConfig(spec=spec))
    split = ds.split("train")
    model = build_model(arch, ds.num_classes).to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    fwd = forward_ceiling(model, len(split), size, batch, device, amp)

    common = dict(backbone_sha256="0" * 64, class_names=ds.class_names, train_counts=ds.train_counts,
                  dataset_id="bench", arch=arch, batch_size=batch, device=device, size=size,
                  workers=workers, amp="bf16" if amp else "off", progress=False)
    small = size <= 64
    t0 = time.perf_counter()
    if small:
        decode_split(split, size, skip_bad=False, workers=workers)
    else:  # the loader alone: the extraction's own batches, without the forward or the write
        job = Extraction(model, split, out_dir / f"{name}-loader.h5", in_memory=False, gpu_decode=gpu_decode, **common)
        for _ in job.source.batches(0, len(split), batch):
            pass
        _sync(device)
    loader = len(split) / (time.perf_counter() - t0)

    out = out_dir / f"{name}.h5"
    t0 = time.perf_counter()
    extract_split(model, split, out, in_memory=small, gpu_decode=gpu_decode, overwrite=True, **common)
    _sync(device)
    e2e = len(split) / (time.perf_counter() - t0)
    ceiling = min(fwd, loader)
    row = {"case": name, "images": len(split), "forward_ceiling": round(fwd), "loader_ceiling": round(loader),
           "extract": round(e2e), "ratio_vs_min_ceiling": round(e2e / ceiling, 3)}
    if gpu_decode:
        row["device_decode_profile"] = device_decode_profile(split.paths, size, batch, device)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cifar-root", default=None, help="ImageFolder of CIFAR-10 JPEGs (train/ used)")
    ap.add_argument("--jpegs", type=int, default=8000, help="ImageNet-sized JPEGs to generate (0: skip)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from ltcli.train import resolve_device

    device = resolve_device(args.device)
    amp = device.type == "cuda"
    tmp = Path(tempfile.mkdtemp(prefix="ltcli-xbench-"))
    rows = []
    if args.cifar_root:
        rows.append(bench_case("resnet32-cifar32", f"imagefolder:{args.cifar_root}", "resnet32", 32, 1024,
                               device, amp, args.workers, False, tmp))
    if args.jpegs:
        make_jpegs(tmp / "jpegs", args.jpegs)
        for gpu_decode in (False, True) if device.type == "cuda" else (False,):
            rows.append(bench_case("resnet50-224-" + ("gpudecode" if gpu_decode else "cpudecode"),
                                   f"imagefolder:{tmp / 'jpegs'}", "resnet50", 224, 256,
                                   device, amp, args.workers, gpu_decode, tmp))
    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    print(f"{'case':26}{'images':>8}{'forward/s':>12}{'loader/s':>12}{'extract/s':>12}{'ratio':>8}   [{gpu}]")
    for r in rows:
        print(f"{r['case']:26}{r['images']:>8}{r['forward_ceiling']:>12,}{r['loader_ceiling']:>12,}"
              f"{r['extract']:>12,}{r['ratio_vs_min_ceiling']:>8.2f}")
        if "device_decode_profile" in r:
            prof = r["device_decode_profile"]
            print(f"{'':26}bytes in memory: nvJPEG decode {prof['decode_only']:,}/s, "
                  f"decode + resize + crop {prof['decode_resize']:,}/s")
    if args.out:
        Path(args.out).write_text(json.dumps({"device": gpu, "torch": torch.__version__, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()

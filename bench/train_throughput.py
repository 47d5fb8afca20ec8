"""Images/s of `ltcli train-backbone` against a bare training loop (same model, batch, dtype).

The bare loop is the ceiling: the same network, optimizer and batch on random tensors that
already sit on the device. train-backbone adds sampling, on-device augmentation, the LR
schedule and bookkeeping. Target (issue 2): >= 70 % of the bare loop for resnet32 on
CIFAR-10-LT at batch 512.

    python bench/train_throughput.py --data imagefolder:PATH --imbalance-factor 100 \
        --arch resnet32 --batch-size 512 --amp bf16 --epochs 4 --out bench/train_throughput.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def bare_loop(arch: str, num_classes: int, batch: int, steps: int, amp: str, device: torch.device) -> float:
    from ltcli.models import build_model

    model = build_model(arch, num_classes).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (batch,), device=device)
    dtype = torch.bfloat16 if amp == "bf16" else None

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(20):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="synthetic")
    ap.add_argument("--imbalance-factor", type=float, default=None)
    ap.add_argument("--arch", default="resnet32")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--amp", default="bf16", choices=["bf16", "off"])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from ltcli.data import DataConfig
    from ltcli.rundir import RunDir
    from ltcli.train import TrainConfig, resolve_device, train_backbone

    device = resolve_device(args.device)
    run_dir = Path(tempfile.mkdtemp(prefix="ltcli-bench-"))
    cfg = TrainConfig(
        data=DataConfig(spec=args.data, imbalance_factor=args.imbalance_factor),
        arch=args.arch, epochs=args.epochs, batch_size=args.batch_size, amp=args.amp,
        device=args.device, warmup_epochs=1,
    )
    t0 = time.perf_counter()
    result = train_backbone(cfg, RunDir(run_dir), progress=False)
    wall = time.perf_counter() - t0
    epochs = result["history"]
    steady = epochs[1:] or epochs  # the first epoch pays for cudnn autotuning and warm-up
    ltcli_ips = sum(e["samples"] for e in steady) / sum(e["seconds"] for e in steady)
    num_classes = len(json.loads((run_dir / "run.json").read_text())["class_names"])
    steps = max(50, int(sum(e["samples"] for e in steady) / args.batch_size))
    bare_ips = bare_loop(args.arch, num_classes, args.batch_size, steps, args.amp, device)
    shutil.rmtree(run_dir, ignore_errors=True)

    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    res = {
        "device": gpu, "torch": torch.__version__, "arch": args.arch, "batch": args.batch_size,
        "amp": args.amp, "data": args.data, "epochs": args.epochs,
        "ltcli_images_per_s": round(ltcli_ips, 1), "bare_images_per_s": round(bare_ips, 1),
        "ratio": round(ltcli_ips / bare_ips, 3), "train_backbone_wall_s": round(wall, 1),
    }
    print(f"{'':24}{'images/s':>12}")
    print(f"{'bare loop':24}{bare_ips:12,.0f}")
    print(f"{'ltcli train-backbone':24}{ltcli_ips:12,.0f}")
    print(f"ratio {res['ratio']:.2f} (target >= 0.70)  [{gpu}, {args.arch}, batch {args.batch_size}, {args.amp}]")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Where and how the network runs: device, mixed precision, torch.distributed, seeding.

One device resolver for every command, so `--device` means the same thing (and fails with
the same message) in train-backbone, extract, fit-head, tune-tau, eval and predict."""

from __future__ import annotations

import contextlib
import functools
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from .errors import LtcliError

DEVICE_HELP = "auto (CUDA if available), cpu, cuda or cuda:N."
AMP_HELP = "auto (bf16 on CUDA, off on the CPU), bf16 or off."


def resolve_device(name: str | torch.device | None) -> torch.device:
    """auto / None: CUDA when available, else CPU; cpu, cuda, cuda:N. Asking for CUDA without
    one is a usage error."""
    if isinstance(name, torch.device):
        return name
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    text = str(name)
    index = text[5:] if text.startswith("cuda:") else None
    if text not in ("cpu", "cuda") and not (index is not None and index.isdigit()):
        raise LtcliError(f"--device {name}: unknown (choose auto, cpu, cuda or cuda:N)")
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            raise LtcliError(f"--device {name}: no CUDA device is available (use --device cpu or auto)")
        if index is not None and int(index) >= torch.cuda.device_count():
            raise LtcliError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(text)


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """--amp: auto means bf16 autocast on CUDA and full precision on the CPU."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if amp in ("off", "none", "fp32"):
        return None
    if amp == "bf16":
        return torch.bfloat16
    raise LtcliError(f"--amp {amp}: unknown (choose auto, bf16, off)")


def autocast(device: torch.device, dtype: torch.dtype | None):
    """The forward's precision context (a no-op without a dtype)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def to_channels_last(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """NHWC on CUDA (faster convolutions), unchanged on the CPU."""
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


# --- torch.distributed (torchrun) ---------------------------------------------------------------


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def process_rank() -> int:
    """This process's rank under torchrun (0 otherwise): only rank 0 prints results."""
    return int(os.environ.get("RANK", "0") or 0)


def init_distributed(device_name: str) -> DistInfo:
    """Join the process group when launched by torchrun (RANK / WORLD_SIZE set)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_name != "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    return DistInfo(rank, world, local_rank)


def local_device(device: torch.device, dist_info: DistInfo) -> torch.device:
    """Under torchrun each rank uses its own GPU."""
    if dist_info.enabled and device.type == "cuda":
        return torch.device("cuda", dist_info.local_rank)
    return device


def shutdown_distributed(dist_info: DistInfo) -> None:
    """A clean exit under torchrun (gloo can abort at interpreter exit otherwise)."""
    if dist_info.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    """Global RNGs, for third-party code that uses them (ltcli itself seeds its own generators)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _cpuinfo(field: str) -> str:
    """The first value of `field` in /proc/cpuinfo ("" where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith(field)), "")
    except OSError:
        return ""


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (/proc/cpuinfo); empty where it cannot be read."""
    return frozenset(_cpuinfo("flags").split())


def cpu_model() -> str:
    """The CPU's model name as Linux reports it ("" where it cannot be read)."""
    return _cpuinfo("model name")

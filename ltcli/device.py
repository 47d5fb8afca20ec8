"""Device and mixed-precision choices shared by every stage that runs the network."""

from __future__ import annotations

import torch

from .errors import LtcliError


def resolve_device(name: str | torch.device) -> torch.device:
    """auto: CUDA when available, else CPU; asking for CUDA without one is a usage error."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise LtcliError(f"--device {name}: unknown (choose auto, cpu, cuda)")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LtcliError(f"--device {name}: no CUDA device is available (use --device cpu or auto)")
    return torch.device(name)


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """--amp: auto means bf16 autocast on CUDA and full precision on the CPU."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if amp in ("off", "none", "fp32"):
        return None
    if amp == "bf16":
        return torch.bfloat16
    raise LtcliError(f"--amp {amp}: unknown (choose auto, bf16, off)")

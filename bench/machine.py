"""The machine a bench ran on, as its JSON records it: CPU model, architecture and core count
(the same x86_64 label covered an AMD EPYC and an Intel Xeon on different days here)."""

from __future__ import annotations

import os
import platform


def describe() -> str:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return f"{model or platform.processor() or 'unknown CPU'} ({platform.machine()}), {os.cpu_count()} CPUs"

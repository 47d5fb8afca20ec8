"""The machine a bench ran on, as its JSON records it: CPU model, architecture and core count
(the same x86_64 label covered an AMD EPYC and an Intel Xeon on different days here)."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ltcli.runtime import cpu_model  # noqa: E402


def describe() -> str:
    return f"{cpu_model() or platform.processor() or 'unknown CPU'} ({platform.machine()}), {os.cpu_count()} CPUs"

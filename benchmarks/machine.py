"""What a benchmark ran on: the CPU model and the instruction sets that decide its bf16 speed, or the GPU."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import psutil
import torch


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = platform.processor() or "unknown", set()
    info = Path("/proc/cpuinfo")
    if info.is_file():
        for line in info.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    return model, flags


def bf16_isa(flags: set[str]) -> str:
    """AMX tiles do bf16 matrix products several times faster than AVX512-BF16, which beats plain float32 FMA."""
    if "amx_bf16" in flags:
        return "AMX-BF16"
    if "avx512_bf16" in flags:
        return "AVX512-BF16 (no AMX)"
    return "no bf16 instructions"


def machine_info() -> dict[str, Any]:
    model, flags = _cpuinfo()
    info: dict[str, Any] = {
        "cpu": model,
        "bf16_isa": bf16_isa(flags),
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 1024**3, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info

"""What a benchmark ran on: the CPU model and the instruction sets that decide its bf16 speed, or the GPU; and
which code ran, and how busy the machine was, so that a result can be read (and compared) for what it is."""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass, field
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


def describe(machine: dict[str, Any]) -> str:
    """One line for a table or a plot title; results from before the CPU was recorded say so, not a guess."""
    if machine.get("gpu"):
        return str(machine["gpu"])
    cpus = f"{machine.get('cpus', '?')} CPUs"
    if not machine.get("cpu"):
        return f"hardware not recorded, {cpus}"
    return f"{machine['cpu']}, {machine.get('bf16_isa', 'bf16 ISA not recorded')}, {cpus}"


def commit() -> str:
    """The code measured: HEAD, and the tracked files that differ from it (a shared tree may hold others' edits)."""
    root = Path(__file__).resolve().parents[1]
    git = ["git", "-C", str(root)]
    try:
        head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        diff = [*git, "diff", "HEAD", "--name-only", "--", ".", ":!benchmarks/results"]  # results are no code
        changed = subprocess.run(diff, capture_output=True, text=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (f" with uncommitted changes to {', '.join(changed)}" if changed else "")


def load_average() -> float:
    """The 1-minute load average: on a shared machine, other jobs' share of the cores."""
    return os.getloadavg()[0]


@dataclass
class RunStart:
    """Taken when a run starts: the commit before the tree can move on, and the load before the run adds its own."""

    commit: str = field(default_factory=commit)
    load: float = field(default_factory=load_average)

    def record(self) -> dict[str, Any]:
        """The fields every results.json carries beside its numbers: `commit` and `machine` (with the load)."""
        return {
            "commit": self.commit,
            "machine": machine_info() | {"load_average": {"start": self.load, "end": load_average()}},
        }

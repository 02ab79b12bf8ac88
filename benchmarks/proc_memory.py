"""A process's own memory figures as the kernel keeps them (/proc/<pid>/status), with its peak that can be started
again. Apart from benchmarks/memory.py, which imports torch for the GPU's figures, so that the unit tests reading a
front end's memory do not import torch."""

from __future__ import annotations

from pathlib import Path


def proc_status_kib(pid: int, field: str) -> int:
    """One memory field of /proc/<pid>/status (VmRSS, VmHWM: the peak, RssAnon), in KiB as the kernel gives it."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith(field + ":")).split()[1])


def reset_peak(pid: int) -> None:
    """Starts the process's peak (VmHWM) again from its current resident size; needs the same user, or root."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")

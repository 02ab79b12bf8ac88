"""What a finished torch.profiler run over a few denoising steps says: the kernels that took the device's time, and
how much of those steps' wall time the device was busy at all (the rest is launch, Python and synchronisation).

On a GPU the timed activities are its kernels (and copies); on the CPU (the smoke run) the operators' own CPU time,
the nearest thing there. Annotated ranges (`record_function`, torch.compile's regions) are left out on both."""

from __future__ import annotations

from typing import Any

from torch.autograd import DeviceType
from torch.autograd.profiler_util import FunctionEvent, FunctionEventAvg
from torch.profiler import profile

TOP = 15
NAME_CHARS = 100  # kernel names run to hundreds of characters of template arguments


def busy_us(intervals: list[tuple[float, float]]) -> float:
    """The time covered by at least one interval: overlapping kernels (several streams) or nested operators (the
    CPU's) count once."""
    covered, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            covered += stop - max(start, end)
            end = stop
    return covered


def summary(profiler: profile, on_gpu: bool, wall_s: float, top: int = TOP) -> dict[str, Any]:
    """The profiled window's top `top` activities by their own time (name, total ms, calls, share of all), and the
    device's busy time against `wall_s`, the window's wall-clock seconds."""
    kind = DeviceType.CUDA if on_gpu else DeviceType.CPU

    def own_us(event: FunctionEvent | FunctionEventAvg) -> float:
        return float(event.self_device_time_total if on_gpu else event.self_cpu_time_total)

    def timed(event: FunctionEvent | FunctionEventAvg) -> bool:
        # Annotated ranges (record_function, torch.compile's regions) span the work inside them: not counted twice
        return bool(event.device_type == kind and not event.is_user_annotation)

    events = [e for e in profiler.events() if timed(e)]
    averages = sorted((a for a in profiler.key_averages() if timed(a)), key=own_us, reverse=True)
    total_us = sum(own_us(a) for a in averages)
    busy_ms = busy_us([(e.time_range.start, e.time_range.end) for e in events]) / 1000
    return {
        "timed": "GPU kernels and copies" if on_gpu else "CPU operators (their own time)",
        "wall_ms": 1000 * wall_s,
        "busy_ms": busy_ms,
        "busy_share": busy_ms / (1000 * wall_s) if wall_s > 0 else None,
        "total_ms": total_us / 1000,
        "distinct": len(averages),
        "top": [
            {
                "name": a.key[:NAME_CHARS],
                "total_ms": own_us(a) / 1000,
                "calls": a.count,
                "share": own_us(a) / total_us if total_us else 0.0,
            }
            for a in averages[:top]
        ],
    }

"""Timing for the in-process benchmarks."""

from __future__ import annotations

import time
from collections.abc import Callable


def best_ms(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of `repeats` calls after one warm-up call (allocations, kernel selection), in milliseconds."""
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return 1000 * min(times)

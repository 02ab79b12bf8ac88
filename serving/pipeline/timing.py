"""Per-stage wall-clock timings reported with every result."""

from __future__ import annotations

import time


class Stopwatch:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        """Record the seconds since the previous lap (or since creation) under `stage`."""
        now = time.perf_counter()
        self.timings[stage] = now - self._last
        self._last = now

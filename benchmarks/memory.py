"""Peak resident memory of process trees, sampled in the background while a benchmark point runs."""

from __future__ import annotations

import threading
from types import TracebackType

import psutil
import torch


def tree_rss(pid: int, children: bool = True) -> int:
    try:
        process = psutil.Process(pid)
        tree = [process, *process.children(recursive=True)] if children else [process]
        return sum(p.memory_info().rss for p in tree)
    except psutil.NoSuchProcess:
        return 0


class PeakMemory:
    """`with PeakMemory([pid, ...]) as peak: ...` then `peak.bytes`: the largest summed RSS seen."""

    def __init__(self, pids: list[int], children: bool = True, interval_s: float = 0.05) -> None:
        self.pids = pids
        self.children = children
        self.interval_s = interval_s
        self.bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.bytes = max(self.bytes, sum(tree_rss(pid, self.children) for pid in self.pids))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()


class GpuPeakMemory:
    """`with GpuPeakMemory() as peak: ...` then `peak.bytes`: the most memory in use on GPU 0 by every process on it
    (Triton's stubs are processes of their own), sampled in the background; None without a GPU."""

    def __init__(self, interval_s: float = 0.1) -> None:
        self.bytes: int | None = 0 if torch.cuda.is_available() else None
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            free, total = torch.cuda.mem_get_info(0)
            self.bytes = max(self.bytes or 0, total - free)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> GpuPeakMemory:
        if self.bytes is not None:
            self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

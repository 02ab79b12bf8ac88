"""Peak resident memory of process trees, and of the GPU, sampled in the background while a benchmark point runs (a
process's own /proc figures: benchmarks/proc_memory.py)."""

from __future__ import annotations

import threading
from types import TracebackType
from typing import Self

import psutil
import torch


def tree_rss(pid: int, children: bool = True) -> int:
    try:
        process = psutil.Process(pid)
        tree = [process, *process.children(recursive=True)] if children else [process]
        return sum(p.memory_info().rss for p in tree)
    except psutil.NoSuchProcess:
        return 0


class _PeakSampler:
    """The largest of `sample()`'s readings, taken every `interval_s` in a background thread while inside `with`."""

    def __init__(self, interval_s: float) -> None:
        self.bytes = 0
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> int:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.is_set():
            self.bytes = max(self.bytes, self.sample())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()


class PeakMemory(_PeakSampler):
    """`with PeakMemory([pid, ...]) as peak: ...` then `peak.bytes`: the largest summed RSS seen."""

    def __init__(self, pids: list[int], children: bool = True, interval_s: float = 0.05) -> None:
        super().__init__(interval_s)
        self.pids = pids
        self.children = children

    def sample(self) -> int:
        return sum(tree_rss(pid, self.children) for pid in self.pids)


class GpuPeakMemory(_PeakSampler):
    """`with GpuPeakMemory() as peak: ...` then `peak.gpu_bytes`: the most memory in use on GPU 0 by every process
    on it (Triton's stubs are processes of their own); None without a GPU."""

    def __init__(self, interval_s: float = 0.1) -> None:
        super().__init__(interval_s)
        self.on_gpu = torch.cuda.is_available()

    def sample(self) -> int:
        free, total = torch.cuda.mem_get_info(0)
        return total - free

    @property
    def gpu_bytes(self) -> int | None:
        return self.bytes if self.on_gpu else None

    def __enter__(self) -> Self:
        return super().__enter__() if self.on_gpu else self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self.on_gpu:
            super().__exit__(exc_type, exc, traceback)

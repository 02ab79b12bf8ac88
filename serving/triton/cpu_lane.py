"""One heavy computation at a time across the component models of a CPU repository.

Each Python-backend model is its own process with its own thread pool sized to every core. When two of them
compute at once (a VAE decode of one request during another's transformer step), their threads share the
cores and every parallel region waits for its slowest, descheduled thread, so both calls slow down many times
over (benchmarks/README.md has the measurement). Taking turns through one file lock keeps each call at full
speed, so the total work finishes sooner. GPU repositories do not use it.

The lock belongs to an open file, not a thread: within one process, callers must already take turns (each
model instance runs one computation at a time).
"""

from __future__ import annotations

import fcntl
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only for the annotation: ONNX Runtime components must not import torch
    from torch import nn

LOCK_FILE = ".cpu-lane.lock"


class CpuLane:
    def __init__(self, repository: Path, enabled: bool) -> None:
        self._file = open(repository / LOCK_FILE, "a") if enabled else None  # noqa: SIM115 (held for the model's life)

    @classmethod
    def for_model(cls, model_dir: Path, params: dict[str, str]) -> CpuLane:
        """The lane of the repository holding `model_dir`, where the model's config turns it on."""
        return cls(model_dir.parent, params.get("cpu_lane", "0") == "1")

    def acquire(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_EX)

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)

    def around_forward(self, module: nn.Module) -> None:
        """Hold the lane during each forward pass of `module` (each generated token), released even on errors."""
        module.register_forward_pre_hook(lambda *_: self.acquire())
        module.register_forward_hook(lambda *_: self.release(), always_call=True)

    def __enter__(self) -> CpuLane:
        self.acquire()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.release()

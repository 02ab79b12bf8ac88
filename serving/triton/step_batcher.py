"""Cross-request batching at the step level: concurrent generations share transformer executions.

Each generation submits the samples its current step needs and awaits their velocities. The batcher waits
until every registered generation has submitted (or a short window passes, so that a slow one does not hold
the others back), then runs all pending samples as one transformer call. Generations at different steps,
sizes and text lengths share a call: packing pads them to one shape.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import torch

from serving.pipeline.denoise import Sample

RunBatch = Callable[[list[Sample]], Awaitable[list[torch.Tensor]]]


@dataclass
class _Pending:
    samples: Sequence[Sample]
    future: asyncio.Future[list[torch.Tensor]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class StepBatcher:
    def __init__(self, run: RunBatch, max_samples: int = 24, window_s: float = 0.005) -> None:
        self.run = run
        self.max_samples = max_samples
        self.window_s = window_s
        self.active = 0
        self.pending: list[_Pending] = []
        self.executions = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def register(self) -> None:
        self.active += 1
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop())

    def unregister(self) -> None:
        self.active -= 1
        self._wake.set()  # the others may all be waiting for this one

    async def submit(self, samples: Sequence[Sample]) -> list[torch.Tensor]:
        pending = _Pending(samples)
        self.pending.append(pending)
        self._wake.set()
        return await pending.future

    async def _loop(self) -> None:
        while self.active > 0 or self.pending:
            await self._wake.wait()
            self._wake.clear()
            if not self.pending:
                continue
            deadline = asyncio.get_running_loop().time() + self.window_s
            while len(self.pending) < self.active and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.0005)
            batch = self._take()
            try:
                velocities = await self.run([s for p in batch for s in p.samples])
            except Exception as exc:  # every waiter learns of the failure; the loop keeps serving
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
            else:
                self.executions += 1
                start = 0
                for p in batch:
                    if not p.future.done():
                        p.future.set_result(velocities[start : start + len(p.samples)])
                    start += len(p.samples)
            if self.pending:
                self._wake.set()
        self._task = None

    def _take(self) -> list[_Pending]:
        """Whole submissions, first come first served, up to max_samples (at least one submission)."""
        taken: list[_Pending] = []
        count = 0
        while self.pending and (not taken or count + len(self.pending[0].samples) <= self.max_samples):
            item = self.pending.pop(0)
            if item.future.cancelled():
                continue
            taken.append(item)
            count += len(item.samples)
        return taken

"""Cross-request batching at the step level: concurrent generations share transformer executions.

Each generation submits the samples its current step needs and awaits their velocities. The batcher waits
until every registered generation has submitted (or a short window passes, so that a slow one does not hold
the others back), then runs all pending samples as one transformer call. Generations at different steps,
sizes and text lengths share a call: packing pads them to one shape. A failed merged call is retried without
the submission that failed it, so one bad request does not fail the others.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import torch

from serving.pipeline.denoise import Sample

log = logging.getLogger(__name__)

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
            await self._run(self._take())
            if self.pending:
                self._wake.set()
        self._task = None

    async def _run(self, batch: list[_Pending]) -> None:
        """One call for the batch. When a merged call fails, each half is retried on its own (bisection), so
        only the submission that caused the failure receives it, at about 2 log2(n) extra calls for n."""
        batch = [p for p in batch if not p.future.done()]
        if not batch:
            return
        try:
            velocities = await self.run([s for p in batch for s in p.samples])
        except Exception as exc:  # the loop keeps serving
            if len(batch) == 1:
                batch[0].future.set_exception(exc)
                return
            log.warning("a call merging %d submissions failed; retrying them in halves", len(batch), exc_info=True)
            half = len(batch) // 2
            await self._run(batch[:half])
            await self._run(batch[half:])
            return
        start = 0
        for p in batch:
            if not p.future.done():
                p.future.set_result(velocities[start : start + len(p.samples)])
            start += len(p.samples)

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

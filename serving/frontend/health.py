"""gRPC health checking that follows Triton: SERVING while Triton and every model are ready, once warmed up.

Each time Triton turns ready (the first start, a restarted Triton, reloaded models) a warm-up runs as a task of its
own (serving/frontend/warmup.py), and health turns SERVING when it ends, whatever its outcome: the poll goes on
meanwhile. Only evidence that what was warmed may be gone warms again: Triton answering that it or a model is not
ready (loading, reloading, stopping), or no answer for UNANSWERED_POLLS polls in a row (a restart); that cancels a
warm-up in progress. A poll Triton does not answer in time (busy under load) says NOT_SERVING until the next one
that it answers READY, which says SERVING again at once: a blip neither re-warms nor stops a warm-up.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from grpc_health.v1 import health, health_pb2
from omnigen2.v1 import omnigen2_pb2 as pb

from serving.frontend.triton_backend import TritonBackend

SERVICE = pb.DESCRIPTOR.services_by_name["OmniGen2"].full_name
# SERVING while the front end's event loop runs this poll, whatever Triton's state: the liveness probe's service.
# "" and SERVICE follow Triton, for readiness and for the clients' own health checks.
LIVENESS = "liveness"
# Polls in a row without an answer (about 3 to 9 s at the 1 s interval and the 2 s poll timeout) taken as Triton
# gone rather than slow: a restart loads the models before it answers again, which takes longer than that.
UNANSWERED_POLLS = 3
log = logging.getLogger("omnigen2.frontend")


class TritonHealth:
    def __init__(
        self, backend: TritonBackend, interval_s: float, warm_up: Callable[[], Awaitable[object]] | None = None
    ) -> None:
        """`warm_up`: run each time Triton turns ready, before SERVING; None: SERVING as soon as Triton is ready."""
        self.servicer = health.aio.HealthServicer()
        self.backend = backend
        self.interval_s = interval_s
        self.warm_up = warm_up
        self.serving = False
        self.served = asyncio.Event()  # set the first time health says SERVING (make serve's banner waits on it)
        self._ready = False
        self._warm = warm_up is None
        self._unanswered = 0  # polls in a row that Triton did not answer
        self._warming: asyncio.Task[None] | None = None
        self._stopping: set[asyncio.Task[None]] = set()  # cancelled warm-ups whose model calls are stopping
        self._closed = False
        # A status is worked out and published under it: the poll and the warm-up's end never interleave.
        self._lock = asyncio.Lock()

    async def refresh(self) -> bool:
        ready = await self.backend.ready()
        async with self._lock:
            self._ready = ready is True
            self._unanswered = self._unanswered + 1 if ready is None else 0
            if self.warm_up is not None and (ready is False or self._unanswered >= UNANSWERED_POLLS):
                self._warm = False
                self._cancel_warm_up()  # its calls would fail; the next ready warms again
            elif ready and not self._warm and self._warming is None and not self._closed:
                self._warming = asyncio.create_task(self._warm_then_serve())
            await self._publish()
        return self.serving

    async def watch(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self.interval_s)

    async def shutdown(self) -> None:
        """NOT_SERVING from now on; a warm-up in progress is asked to stop (wait_closed waits for it)."""
        await self.servicer.enter_graceful_shutdown()
        self._closed = True
        self._cancel_warm_up()

    async def wait_closed(self) -> None:
        """A stopped warm-up ends once its model calls have stopped (each within --stop-grace-s)."""
        await asyncio.gather(*self._stopping, return_exceptions=True)

    def _cancel_warm_up(self) -> None:
        if self._warming is not None:
            self._warming.cancel()
            self._stopping.add(self._warming)
            self._warming.add_done_callback(self._stopping.discard)
            self._warming = None

    async def _warm_then_serve(self) -> None:
        assert self.warm_up is not None
        try:
            await self.warm_up()
        except Exception:  # a fault of the warm-up itself must not keep the replica NOT_SERVING
            log.exception("warm-up broke; health turns SERVING anyway")
        async with self._lock:
            if asyncio.current_task() is not self._warming:  # cancelled meanwhile: Triton went away
                return
            self._warming = None
            self._warm = True
            await self._publish()

    async def _publish(self) -> None:
        self.serving = self._ready and self._warm
        if self.serving:
            self.served.set()
        status = health_pb2.HealthCheckResponse.SERVING if self.serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE):
            await self.servicer.set(service, status)
        await self.servicer.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)

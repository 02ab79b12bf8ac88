"""gRPC health checking that follows Triton: SERVING while Triton and the `omnigen2` model are ready."""

from __future__ import annotations

import asyncio

from grpc_health.v1 import health, health_pb2
from omnigen2.v1 import omnigen2_pb2 as pb

from serving.frontend.triton_backend import TritonBackend

SERVICE = pb.DESCRIPTOR.services_by_name["OmniGen2"].full_name
# SERVING while the front end's event loop runs this poll, whatever Triton's state: the liveness probe's service.
# "" and SERVICE follow Triton, for readiness and for the clients' own health checks.
LIVENESS = "liveness"


class TritonHealth:
    def __init__(self, backend: TritonBackend, interval_s: float) -> None:
        self.servicer = health.aio.HealthServicer()
        self.backend = backend
        self.interval_s = interval_s
        self.serving = False

    async def refresh(self) -> bool:
        self.serving = await self.backend.ready()
        status = health_pb2.HealthCheckResponse.SERVING if self.serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE):
            await self.servicer.set(service, status)
        await self.servicer.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
        return self.serving

    async def watch(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self.interval_s)

    async def shutdown(self) -> None:
        await self.servicer.enter_graceful_shutdown()

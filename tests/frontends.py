"""A front end in process, for tests that call it over real gRPC without Triton: nothing answers on its
`triton_url` (its health polls find nothing), so each test gives it the backend it needs; and a wait on what it
does meanwhile. And a stand-in OmniGen2 server, for the SDK's and the CLI's tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from omnigen2.v1 import omnigen2_pb2_grpc as pb_grpc

from serving.frontend.config import FrontendConfig
from serving.frontend.server import Frontend
from serving.triton.ports import free_port


@asynccontextmanager
async def in_process_frontend(**changes: object) -> AsyncIterator[tuple[Frontend, grpc.aio.Channel]]:
    """The front end, started with `changes` to its config (a 1 s shutdown grace unless given), and a channel to it."""
    fields = {"listen": "127.0.0.1:0", "triton_url": f"127.0.0.1:{free_port()}", "metrics_port": 0}
    frontend = Frontend(FrontendConfig(**{**fields, "shutdown_grace_s": 1.0, **changes}))  # type: ignore[arg-type]
    port = await frontend.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield frontend, channel
    finally:
        await frontend.stop()


async def until(condition: Callable[[], object], what: str, timeout_s: float = 30) -> None:
    """Polls `condition` until it is true; fails naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout_s:g} s for {what}"
        await asyncio.sleep(0.01)


@contextmanager
def fake_server(
    servicer: pb_grpc.OmniGen2Servicer,
    credentials: grpc.ServerCredentials | None = None,
    health_servicer: health.HealthServicer | None = None,
) -> Iterator[str]:
    """`servicer` as the OmniGen2 service on a free loopback port (TLS with `credentials`; a health service beside
    it when given): yields its address, and stops it on leaving."""
    server = grpc.server(ThreadPoolExecutor(8))  # room for blocking health Watch streams beside the calls
    pb_grpc.add_OmniGen2Servicer_to_server(servicer, server)
    if health_servicer is not None:
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = "127.0.0.1:0"
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0)

"""A front end in process, for tests that call it over real gRPC without Triton: nothing answers on its
`triton_url` (its health polls find nothing), so each test gives it the backend it needs; and a wait on what it
does meanwhile."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import grpc

from serving.frontend.config import FrontendConfig
from serving.frontend.server import Frontend
from serving.triton.launcher import free_port


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

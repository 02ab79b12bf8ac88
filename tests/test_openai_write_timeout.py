"""The OpenAI gateway's write timeout with a stand-in for the gRPC service (no Triton): a stream whose call failed
and whose error event the caller then takes nothing of is cut off as 408, not counted under the call's status."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import grpc
from omnigen2.v1 import omnigen2_pb2 as pb

from serving.frontend.config import FrontendConfig
from serving.frontend.metrics import Metrics
from serving.frontend.openai_http import OpenAIGateway

ROUTE = "/v1/chat/completions"


class FailingChat:
    """An Understand call that answers one delta, then fails with a message of megabytes: its error event is more
    than the connection's buffers hold."""

    def __aiter__(self) -> AsyncIterator[pb.UnderstandEvent]:
        return self._events()

    async def _events(self) -> AsyncIterator[pb.UnderstandEvent]:
        yield pb.UnderstandEvent(delta="a")
        metadata = grpc.aio.Metadata()
        raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, metadata, metadata, details="x" * (16 << 20))

    def cancel(self) -> bool:
        return False


class Service:
    def Understand(self, message: pb.UnderstandRequest, metadata: Any) -> FailingChat:  # noqa: N802 (the stub's name)
        return FailingChat()


def test_a_stream_whose_error_event_nobody_reads_is_408() -> None:
    async def run() -> dict[str, float]:
        gateway = OpenAIGateway(FrontendConfig(stream_write_timeout_s=0.5), "unix:unused", Metrics())
        port = await gateway.start("127.0.0.1:0")
        gateway.stub = Service()  # type: ignore[assignment]
        loop = asyncio.get_running_loop()
        caller = socket.socket()
        caller.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # reads nothing: the answer backs up
        caller.setblocking(False)
        try:
            await loop.sock_connect(caller, ("127.0.0.1", port))
            body = json.dumps({"messages": [{"role": "user", "content": "x"}], "stream": True}).encode()
            head = f"POST {ROUTE} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json"
            head += f"\r\nContent-Length: {len(body)}"
            await loop.sock_sendall(caller, f"{head}\r\n\r\n".encode() + body)
            counts: dict[str, float] = {}
            for _ in range(100):
                await asyncio.sleep(0.1)
                counts = {
                    sample.labels["status"]: sample.value
                    for family in gateway.metrics.registry.collect()
                    if family.name == "omnigen2_http_requests"
                    for sample in family.samples
                    if sample.name.endswith("_total")
                }
                if counts:
                    break
            return counts
        finally:
            caller.close()
            await gateway.stop()

    assert asyncio.run(run()) == {"408": 1.0}  # before: {"503": 1.0}, UNAVAILABLE's status

"""How calls are recorded (access log and counters), in process with stand-ins for what they call: a stream the caller
took whole."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
from omnigen2.v1 import omnigen2_pb2 as pb

from serving.frontend.config import FrontendConfig
from serving.frontend.metrics import Metrics
from serving.frontend.openai_http import OpenAIGateway

CHAT = b'{"messages": [{"role": "user", "content": "x"}], "stream": true}'


class AnsweredChat:
    """An Understand stream that answers at once: one delta, then its result."""

    def __aiter__(self) -> AsyncIterator[pb.UnderstandEvent]:
        return self._events()

    async def _events(self) -> AsyncIterator[pb.UnderstandEvent]:
        yield pb.UnderstandEvent(delta="a")
        yield pb.UnderstandEvent(result=pb.UnderstandResult(text="a"))

    def cancel(self) -> bool:
        return False


class ChatService:
    def Understand(self, message: pb.UnderstandRequest, metadata: Any) -> AnsweredChat:  # noqa: N802 (the stub's)
        return AnsweredChat()


def _http_counts(metrics: Metrics) -> dict[str, float]:
    return {
        sample.labels["status"]: sample.value
        for family in metrics.registry.collect()
        if family.name == "omnigen2_http_requests"
        for sample in family.samples
        if sample.name.endswith("_total")
    }


def test_a_stream_read_to_its_end_then_closed_is_200(caplog: pytest.LogCaptureFixture) -> None:
    """The caller reads every event, [DONE] and the body's last chunk, then closes at once: it got the whole answer,
    so not 499 (the caller gone) in the log or the metrics."""
    calls = 20

    async def run() -> dict[str, float]:
        gateway = OpenAIGateway(FrontendConfig(), "unix:unused", Metrics())
        port = await gateway.start("127.0.0.1:0")
        gateway.stub = ChatService()  # type: ignore[assignment]
        loop = asyncio.get_running_loop()
        head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        try:
            for _ in range(calls):
                caller = socket.socket()
                caller.setblocking(False)
                await loop.sock_connect(caller, ("127.0.0.1", port))
                await loop.sock_sendall(caller, f"{head}Content-Length: {len(CHAT)}\r\n\r\n".encode() + CHAT)
                got = b""
                while not got.endswith(b"0\r\n\r\n"):
                    chunk = await loop.sock_recv(caller, 65536)
                    assert chunk, got
                    got += chunk
                assert b"data: [DONE]" in got
                caller.close()
            for _ in range(100):
                if sum(_http_counts(gateway.metrics).values()) == calls:
                    break
                await asyncio.sleep(0.02)
            return _http_counts(gateway.metrics)
        finally:
            await gateway.stop()

    with caplog.at_level(logging.INFO, logger="omnigen2.access"):
        counts = asyncio.run(run())
    lines = [r.getMessage() for r in caplog.records if r.name == "omnigen2.access"]
    assert counts == {"200": float(calls)}  # before: mostly 499
    assert len(lines) == calls and all(" status=200 " in line for line in lines), lines

"""The OpenAI gateway's bounds on slow callers and on connections, with a stand-in for the gRPC service (no Triton):
an answer taken below --stream-min-write-rate is cut off, and past --http-max-connections a new connection is
answered 503 and closed while the open ones are still served."""

from __future__ import annotations

import asyncio
import json
import resource
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from omnigen2.v1 import omnigen2_pb2 as pb

from serving.frontend.config import FrontendConfig
from serving.frontend.http_connections import open_files
from serving.frontend.metrics import Metrics
from serving.frontend.openai_http import OpenAIGateway, _Progress

ROUTE = "/v1/chat/completions"


class Chat:
    """An Understand call that answers `count` deltas of `size` characters, `pause_s` apart, then its result."""

    def __init__(self, count: int, size: int, pause_s: float = 0.0) -> None:
        self.count, self.size, self.pause_s = count, size, pause_s

    def __aiter__(self) -> AsyncIterator[pb.UnderstandEvent]:
        return self._events()

    async def _events(self) -> AsyncIterator[pb.UnderstandEvent]:
        for _ in range(self.count):
            await asyncio.sleep(self.pause_s)
            yield pb.UnderstandEvent(delta="x" * self.size)
        yield pb.UnderstandEvent(result=pb.UnderstandResult(text="x"))

    def cancel(self) -> bool:
        return False


class Service:
    def __init__(self, chat: Chat) -> None:
        self.chat = chat

    def Understand(self, message: pb.UnderstandRequest, metadata: Any) -> Chat:  # noqa: N802 (the stub's name)
        return self.chat


def _sample(metrics: Metrics, name: str, **labels: str) -> float:
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


def _request() -> bytes:
    body = json.dumps({"messages": [{"role": "user", "content": "x"}], "stream": True}).encode()
    head = f"POST {ROUTE} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json"
    head += f"\r\nContent-Length: {len(body)}"
    return f"{head}\r\n\r\n".encode() + body


async def _read(caller: socket.socket, chunk: int, pause_s: float, until: float) -> bytes:
    """What `caller` receives, `chunk` bytes every `pause_s`, until it closes or `until` (loop time) passes."""
    loop = asyncio.get_running_loop()
    got = b""
    while loop.time() < until:
        try:
            piece = await asyncio.wait_for(loop.sock_recv(caller, chunk), until - loop.time())
        except (TimeoutError, ConnectionResetError):
            break
        if not piece:
            break
        got += piece
        await asyncio.sleep(pause_s)
    return got


def _stream(config: FrontendConfig, chat: Chat, chunk: int, pause_s: float, within_s: float) -> tuple[bytes, Metrics]:
    """A streamed chat answer read `chunk` bytes every `pause_s`, and the metrics. The connection's buffers are
    kept small on both ends: loopback's send buffer grows to megabytes, which the caller's reads then free in
    steps of a megabyte, and the gateway sees the caller take bytes only as its transport's buffer shrinks."""

    async def run() -> bytes:
        gateway = OpenAIGateway(config, "unix:unused", metrics)
        port = await gateway.start("127.0.0.1:0")
        gateway.stub = Service(chat)  # type: ignore[assignment]
        loop = asyncio.get_running_loop()
        caller = socket.socket()
        caller.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        caller.setblocking(False)
        try:
            await loop.sock_connect(caller, ("127.0.0.1", port))
            await asyncio.sleep(0.05)
            assert gateway.runner.server is not None
            (served,) = gateway.runner.server.connections
            assert served.transport is not None
            served.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
            await loop.sock_sendall(caller, _request())
            answer = await _read(caller, chunk, pause_s, loop.time() + within_s)
            await asyncio.sleep(0.2)  # the handler's end, counted
            return answer
        finally:
            caller.close()
            await gateway.stop()

    metrics = Metrics()
    return asyncio.run(run()), metrics


def test_an_answer_taken_below_the_minimum_rate_is_cut_off() -> None:
    """4 MiB taken at about 40 KiB/s, never a gap of the write timeout: cut off (408) once, past the 1 s grace, it
    is behind 256 KiB/s; before, a caller taking a byte per timeout held its place for as long as it liked."""
    config = FrontendConfig(stream_write_timeout_s=1, stream_min_write_rate=256 * 1024)
    start = time.monotonic()
    answer, metrics = _stream(config, Chat(64, 64 * 1024), chunk=4096, pause_s=0.1, within_s=20)
    assert time.monotonic() - start < 5
    assert b"[DONE]" not in answer
    assert _sample(metrics, "omnigen2_cut_off_transfers_total", api="http", transfer="answer", reason="slow") == 1
    assert _sample(metrics, "omnigen2_http_requests_total", method="POST", route=ROUTE, status="408") == 1


def test_time_spent_on_the_work_between_events_is_not_the_callers() -> None:
    """Events 0.3 s apart for 3 s, the caller taking each at once: the rate is of the time the writes waited for
    the caller, not of the call's, so a minimum far above what the answer's size over 3 s comes to cuts nothing."""
    config = FrontendConfig(stream_write_timeout_s=0.5, stream_min_write_rate=1 << 20)
    answer, metrics = _stream(config, Chat(10, 100, pause_s=0.3), chunk=65536, pause_s=0.0, within_s=10)
    assert answer.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
    assert _sample(metrics, "omnigen2_http_requests_total", method="POST", route=ROUTE, status="200") == 1


def test_connections_past_the_bound_are_refused_while_the_open_ones_are_served() -> None:
    async def run(metrics: Metrics) -> None:
        gateway = OpenAIGateway(FrontendConfig(http_max_connections=3, retry_after_s=2), "unix:unused", metrics)
        port = await gateway.start("127.0.0.1:0")
        loop = asyncio.get_running_loop()

        async def connect() -> socket.socket:
            sock = socket.socket()
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", port))
            await asyncio.sleep(0.05)  # accepted, connection_made called
            return sock

        async def ask(sock: socket.socket) -> bytes:
            await loop.sock_sendall(sock, b"GET /nowhere HTTP/1.1\r\nHost: localhost\r\n\r\n")
            return await asyncio.wait_for(loop.sock_recv(sock, 4096), 5)

        held = [await connect() for _ in range(3)]
        extra = await connect()
        try:
            refused = await asyncio.wait_for(loop.sock_recv(extra, 4096), 5)  # before: never answered, never closed
            assert refused.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 2\r\n" in refused
            assert await asyncio.wait_for(loop.sock_recv(extra, 4096), 5) == b""  # closed
            assert (await ask(held[0])).startswith(b"HTTP/1.1 404 ")  # the open ones still served
            assert _sample(metrics, "omnigen2_http_connections") == 3
            held.pop().close()
            await asyncio.sleep(0.1)
            again = await connect()
            held.append(again)
            assert (await ask(again)).startswith(b"HTTP/1.1 404 ")  # a place came back
        finally:
            for sock in [*held, extra]:
                sock.close()
            await gateway.stop()

    metrics = Metrics()
    asyncio.run(run(metrics))
    assert _sample(metrics, "omnigen2_http_connections_refused_total") == 1


def test_the_open_file_limit_is_raised_to_its_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard < 2:
        pytest.skip("no finite hard limit to raise to")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard - 1, hard))
    try:
        assert open_files() == hard
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize(
    "flags", [["--http-min-body-rate=0"], ["--stream-min-write-rate=-1"], ["--http-max-connections=-1"]]
)
def test_rates_and_the_connection_bound_are_validated(flags: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as refused:  # argparse's usage error, naming the flag
        FrontendConfig.from_args(flags)
    assert refused.value.code == 2
    assert f"argument {flags[0].split('=')[0]}: must be" in capsys.readouterr().err


def test_the_flags_are_read() -> None:
    flags = ["--http-min-body-rate=1000", "--stream-min-write-rate=2000", "--http-max-connections=7"]
    config = FrontendConfig.from_args(flags)
    assert (config.http_min_body_rate, config.stream_min_write_rate, config.http_max_connections) == (1000, 2000, 7)


def test_writes_taken_at_once_but_late_are_not_the_callers() -> None:
    """200 events of 20 bytes, each write taken at once but 5 ms late (the event loop busy elsewhere), then one the
    caller takes 0.2 s on, against a 0.3 s grace at 32 KiB/s: before, the loop's 1 s of delays counted as the
    caller's, and that write was cut off as slow."""

    async def run() -> None:
        taken = 0
        progress = _Progress(lambda: taken, 0.3, 32 * 1024)

        async def write(seconds: float) -> None:
            nonlocal taken
            await asyncio.sleep(seconds)
            taken += 20

        for _ in range(200):
            await progress.wait(write(0.005))
        await progress.wait(write(0.2))

    asyncio.run(run())

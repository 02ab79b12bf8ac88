"""How calls are recorded (access log and counters), in process with stand-ins for what they call: a stream the caller
took whole, a cancel that the model confirms after the deadline, calls that end at the read gate or the token check."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import socket
import types
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from omnigen2.v1 import omnigen2_pb2 as pb
from omnigen2.v1 import omnigen2_pb2_grpc as pb_grpc

from serving.frontend.auth import token_digest
from serving.frontend.config import FrontendConfig, MiB
from serving.frontend.metrics import Metrics
from serving.frontend.openai_http import OpenAIGateway
from serving.triton.wire import STOP_PARAMETER
from tests.frontends import in_process_frontend, until

GENERATE = "/omnigen2.v1.OmniGen2/Generate"
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
        head = "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
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


def _access_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "omnigen2.access"]


class Progress:
    def as_numpy(self, name: str) -> np.ndarray | None:
        return np.array([json.dumps({"type": "progress", "step": 1, "total": 3}).encode()]) if name == "event" else None

    def get_response(self) -> Any:
        return types.SimpleNamespace(raw_output_contents=[])


class SlowToStop:
    """A Triton stream standing in for the BLS's: a step, then nothing until a stop request comes, which it
    confirms (ends the stream) confirm_s later, as a model finishing its step does."""

    def __init__(self, requests: AsyncIterator[dict[str, Any]], confirm_s: float) -> None:
        self.requests = requests
        self.confirm_s = confirm_s
        self.responses = self._responses()

    def __aiter__(self) -> AsyncIterator[tuple[Progress, None]]:
        return self.responses  # one stream: read again once ended (the front end drains it), it stays ended

    async def _responses(self) -> AsyncIterator[tuple[Progress, None]]:
        await anext(self.requests)  # the call
        yield Progress(), None
        async for request in self.requests:
            if STOP_PARAMETER in request["parameters"]:
                await asyncio.sleep(self.confirm_s)
                return

    def cancel(self) -> None:
        pass


class SlowToStopClient:
    """Streams SlowToStop; the rest (health's polls, close) is the client it replaces (nothing answers it)."""

    def __init__(self, replaced: Any, confirm_s: float) -> None:
        self.replaced = replaced
        self.confirm_s = confirm_s

    def __getattr__(self, name: str) -> Any:
        return getattr(self.replaced, name)

    def stream_infer(self, requests: AsyncIterator[dict[str, Any]], stream_timeout: float) -> SlowToStop:
        return SlowToStop(requests, self.confirm_s)


@pytest.mark.parametrize("cancel", [True, False])
def test_a_call_is_recorded_with_the_status_its_caller_saw(cancel: bool, caplog: pytest.LogCaptureFixture) -> None:
    """Cancelled before its 3 s deadline (room for a loaded box's first event), whose stop the model confirms 4 s
    later, after it: CANCELLED, as the caller saw, not DEADLINE_EXCEEDED by the time the call took (before). Not
    cancelled: DEADLINE_EXCEEDED at its 1 s deadline."""
    seen = "CANCELLED" if cancel else "DEADLINE_EXCEEDED"
    deadline_s, confirm_s = (3.0, 4.0) if cancel else (1.0, 1.5)

    async def run() -> None:
        async with in_process_frontend() as (frontend, channel):
            frontend.backend.client = SlowToStopClient(frontend.backend.client, confirm_s)
            call = pb_grpc.OmniGen2Stub(channel).GenerateStream(pb.GenerateRequest(prompt="a"), timeout=deadline_s)
            await call.read()
            if cancel:
                call.cancel()
            assert (await call.code()).name == seen
            counted = frontend.metrics.registry.get_sample_value
            labels = {"method": "GenerateStream", "code": seen}
            # The handler ends once the model has stopped.
            await until(functools.partial(counted, "omnigen2_requests_total", labels), f"a {seen} count", 8)
            assert counted("omnigen2_requests_total", labels) == 1

    with caplog.at_level(logging.INFO, logger="omnigen2.access"):
        asyncio.run(run())
    (line,) = _access_lines(caplog)
    assert f" status={seen} " in line, line


async def _never() -> AsyncIterator[bytes]:  # the call opens; its one message is never sent
    await asyncio.sleep(3600)
    yield b""


def test_calls_that_end_at_the_read_gate_leave_one_line_each(caplog: pytest.LogCaptureFixture) -> None:
    """Two calls that never send their request hold the uploads budget, and a third is refused after waiting
    --retry-after-s for room. Before, the silent ones, cancelled by their callers, left no line and no count, and
    the refused one's line had neither its peer, its request id nor the second it waited."""

    async def run() -> None:
        async with in_process_frontend(max_request_bytes=MiB, max_held_request_bytes=4 * MiB, retry_after_s=0.5) as (
            frontend,
            channel,
        ):
            generate = channel.stream_unary(GENERATE)
            silent = [generate(_never(), timeout=60, metadata=(("x-request-id", f"silent-{i}"),)) for i in range(2)]
            held = frontend.metrics.registry.get_sample_value
            for _ in range(1000):  # each silent call reserves twice --max-request-bytes: the budget is full
                if held("omnigen2_held_request_bytes", {"budget": "uploads"}) == 4 * MiB:
                    break
                await asyncio.sleep(0.01)
            assert held("omnigen2_held_request_bytes", {"budget": "uploads"}) == 4 * MiB
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await generate(iter([b""]), timeout=60, metadata=(("x-request-id", "refused"),))
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            await asyncio.sleep(0.5)
            for call in silent:
                call.cancel()
            counted = frontend.metrics.registry.get_sample_value
            cancelled = {"method": "Generate", "code": "CANCELLED"}
            for _ in range(300):
                if counted("omnigen2_requests_total", cancelled) == 2:
                    break
                await asyncio.sleep(0.01)
            assert counted("omnigen2_requests_total", cancelled) == 2
            assert counted("omnigen2_requests_total", {"method": "Generate", "code": "RESOURCE_EXHAUSTED"}) == 1

    with caplog.at_level(logging.INFO, logger="omnigen2.access"):
        asyncio.run(run())
    lines = {line.split(" request_id=")[1].split()[0]: line for line in _access_lines(caplog)}
    assert sorted(lines) == ["refused", "silent-0", "silent-1"] and len(_access_lines(caplog)) == 3, lines
    for name, status, at_least_s in (("refused", "RESOURCE_EXHAUSTED", 0.5), ("silent-0", "CANCELLED", 1.0)):
        line = lines[name]
        assert f" status={status} " in line and " peer=ipv4:127.0.0.1:" in line, line
        assert float(line.split(" seconds=")[1].split()[0]) >= at_least_s, line


def test_calls_refused_by_the_token_check_are_recorded_with_their_peer_and_id(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No token, a token outside its scope, a token over its rate: one line and one count each, with the caller's
    peer and x-request-id. Before, these were logged peer=- request_id=- seconds=0.000."""
    tokens = tmp_path / "tokens.json"
    entries = [
        {"name": "info-only", "sha256": token_digest("info"), "methods": ["GetModelInfo"]},
        {"name": "slow", "sha256": token_digest("slow"), "rate_per_minute": 1, "burst": 1},
    ]
    tokens.write_text(json.dumps({"tokens": entries}))
    calls = [  # (request id, token, status): an empty request passes the token check, then is invalid
        ("no-token", None, "UNAUTHENTICATED"),
        ("out-of-scope", "info", "PERMISSION_DENIED"),
        ("first", "slow", "INVALID_ARGUMENT"),
        ("over-rate", "slow", "RESOURCE_EXHAUSTED"),
    ]

    async def run() -> None:
        async with in_process_frontend(auth_tokens=str(tokens)) as (frontend, channel):
            generate = channel.unary_unary(GENERATE)
            for call_id, token, status in calls:
                metadata = [("x-request-id", call_id)] + ([("authorization", f"Bearer {token}")] if token else [])
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await generate(b"", timeout=30, metadata=metadata)
                assert refused.value.code().name == status
            counted = frontend.metrics.registry.get_sample_value
            for _, _, status in calls:  # a call is recorded once its status is out: maybe after its caller saw it
                labels = {"method": "Generate", "code": status}
                await until(functools.partial(counted, "omnigen2_requests_total", labels), f"a {status} count", 3)
                assert counted("omnigen2_requests_total", labels) == 1

    with caplog.at_level(logging.INFO, logger="omnigen2.access"):
        asyncio.run(run())
    lines = {line.split(" request_id=")[1].split()[0]: line for line in _access_lines(caplog)}
    assert sorted(lines) == sorted(call_id for call_id, _, _ in calls) and len(_access_lines(caplog)) == len(calls)
    for call_id, _, status in calls:
        line = lines[call_id]
        assert f" status={status} " in line, line
        assert " peer=ipv4:127.0.0.1:" in line, line
        assert 0.0 <= float(line.split(" seconds=")[1].split()[0]) < 10.0, line

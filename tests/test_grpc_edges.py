"""What a caller chooses at the gRPC transport, before any handler runs: the message's compression and the method
path. A front end in process, no Triton: each call here is answered before one is needed."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import logging
import threading
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from omnigen2.v1 import omnigen2_pb2 as pb

from serving.frontend.auth import token_digest
from serving.frontend.config import FrontendConfig, MiB
from serving.frontend.server import Frontend
from serving.triton.ports import free_port
from tests.frontends import in_process_frontend, until

GENERATE = "/omnigen2.v1.OmniGen2/Generate"


def _raw(channel: grpc.aio.Channel, method: str) -> grpc.aio.UnaryUnaryMultiCallable:
    return channel.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)


def _tokens(tmp_path: Path) -> str:
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"tokens": [{"name": "t", "sha256": token_digest("secret")}]}))
    return str(path)


def _series(frontend: Frontend, metric: str) -> list[dict[str, str]]:
    return [
        sample.labels
        for family in frontend.metrics.registry.collect()
        for sample in family.samples
        if sample.name == metric
    ]


@pytest.mark.parametrize("compression", [grpc.Compression.Gzip, grpc.Compression.Deflate])
def test_a_compressed_request_is_refused_before_it_is_inflated(compression: grpc.Compression) -> None:
    """Before, gRPC inflated the whole message, then refused it over the size cap: 1 MB inflating to 1 GiB took
    the front end's memory from 0.08 to 1.2 GB (0.5 GB kept). The status names the algorithm; identity is served."""
    bomb = pb.GenerateRequest(prompt="a" * 64 * MiB).SerializeToString()  # about 64 KiB once compressed

    async def run() -> None:
        async with in_process_frontend(max_request_bytes=MiB) as (_, channel):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await _raw(channel, GENERATE)(bomb, timeout=30, compression=compression)
            assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED, refused.value.details()
            assert "is disabled" in (refused.value.details() or "")
            with pytest.raises(grpc.aio.AioRpcError) as read:  # the same call uncompressed: read and validated
                await _raw(channel, GENERATE)(pb.GenerateRequest().SerializeToString(), timeout=30)
            assert read.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    asyncio.run(run())


@pytest.mark.parametrize("auth", [False, True])
def test_unknown_methods_are_unimplemented_and_add_no_label(
    tmp_path: Path, auth: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Before, with --auth-tokens, an unauthenticated call to an unknown method of the service ended UNKNOWN (a
    traceback in the log), added a label value per name to omnigen2_requests_total and wrote the name, spaces and
    all, into the access log (fields forged)."""
    forged = f"{GENERATE} peer=ipv4:10.0.0.1:1234 client=admin status=OK"
    names = [forged, "/omnigen2.v1.OmniGen2/Bogus" + "x" * 4000, "/omnigen2.v1.OmniGen2/", "/other.Service/Generate"]

    async def run() -> None:
        async with in_process_frontend(auth_tokens=_tokens(tmp_path) if auth else "") as (frontend, channel):
            for name in names:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await _raw(channel, name)(b"", timeout=10)
                assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED, refused.value.details()
            assert _series(frontend, "omnigen2_requests_total") == []
            if auth:  # a known method without a token is still refused, and counted under its name
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await _raw(channel, GENERATE)(b"", timeout=10)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
                labels = _series(frontend, "omnigen2_requests_total")
                assert labels == [{"method": "Generate", "code": "UNAUTHENTICATED"}]

    with caplog.at_level(logging.INFO):
        asyncio.run(run())
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert not [record for record in caplog.records if "admin" in record.getMessage()]


def test_a_refusal_of_a_method_outside_the_service_counts_as_unknown() -> None:
    """The refusals the interceptors count take their label from the method path: only the service's own names
    become label values, whatever path reaches them."""

    async def run() -> None:
        async with in_process_frontend() as (frontend, _):
            for method in ("/omnigen2.v1.OmniGen2/Bogus x", "/other.Service/Generate", GENERATE):
                frontend._denied(method, grpc.StatusCode.UNAUTHENTICATED, "ipv4:127.0.0.1:1", 0.0, "id")
            methods = sorted(labels["method"] for labels in _series(frontend, "omnigen2_requests_total"))
            assert methods == ["Generate", "unknown"]

    asyncio.run(run())


def test_calls_cut_at_the_end_of_the_grace_period_are_recorded_as_the_caller_saw_them() -> None:
    """A call still running when stop()'s grace period ends reaches its caller as UNAVAILABLE ("Cancelling all
    calls"), and an HTTP request there is the server's failure: before, they were recorded as CANCELLED and 499
    (the caller went away). A call the caller cancels during the grace period stays CANCELLED. Each step waits for
    the server to report the state it needs, not for a guessed time (a loaded CI box missed 0.5 s)."""
    grace_s = 4.0

    async def run() -> None:
        unused = f"127.0.0.1:{free_port()}"
        fields = {"listen": "127.0.0.1:0", "triton_url": unused, "metrics_port": 0, "shutdown_grace_s": grace_s}
        frontend = Frontend(FrontendConfig(**fields, http_listen=f"127.0.0.1:{free_port()}"))  # type: ignore[arg-type]
        port = await frontend.start()
        asking = 0  # GetModelInfo calls waiting on the backend

        async def never() -> dict[str, str]:  # the backend's parameters never come: the call runs until cut
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

        async def parameters() -> dict[str, str]:
            nonlocal asking
            asking += 1
            return await never()

        async def answer(*args: object, **kwargs: object) -> AsyncIterator[dict[str, str]]:  # one delta, then none
            yield {"type": "delta", "text": "a"}
            await never()

        frontend.backend.model_parameters = parameters  # type: ignore[method-assign]
        frontend.backend.understand = answer  # type: ignore[method-assign,assignment]
        counted = frontend.metrics.registry.get_sample_value
        ended = ("UNAVAILABLE", "CANCELLED")

        def gets(code: str) -> float | None:
            return counted("omnigen2_requests_total", {"method": "GetModelInfo", "code": code})

        base = f"http://{frontend.config.http_listen}/v1"
        chat = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            info = channel.unary_unary("/omnigen2.v1.OmniGen2/GetModelInfo", lambda b: b, lambda b: b)
            cut, left = info(b"", timeout=30), info(b"", timeout=30)
            models = asyncio.create_task(asyncio.to_thread(_get, urllib.request.Request(f"{base}/models")))
            body = json.dumps(chat).encode()  # a stream: 200 and a delta sent when it is cut
            chat_stream = urllib.request.Request(f"{base}/chat/completions", body, {"Content-Type": "application/json"})
            streaming = threading.Event()
            answered = asyncio.create_task(asyncio.to_thread(_get, chat_stream, streaming))
            await until(lambda: asking == 3, "both gRPC calls and /v1/models' to wait on the backend")
            await until(streaming.is_set, "the chat stream's first event to reach its caller")
            assert frontend.gateway is not None and frontend.gateway.listener is not None
            listener = frontend.gateway.listener
            begun = time.monotonic()  # the cut comes grace_s after stop() starts, so after begun + grace_s
            stop = asyncio.create_task(frontend.stop())
            await until(lambda: not listener.is_serving(), "stop() to begin its grace period")
            left.cancel()  # by its caller, within the grace period
            await until(lambda: sum(gets(c) or 0 for c in ended) == 1, "the cancelled call to be recorded")
            assert time.monotonic() < begun + grace_s, "the caller's cancel was recorded after the grace period"
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await cut
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
            await stop
            await models
            assert "server_error" in await answered  # the stream's error event
        assert [gets(c) for c in ended] == [2, 1]  # the HTTP request's GetModelInfo is cut too
        assert counted("omnigen2_requests_total", {"method": "Understand", "code": "UNAVAILABLE"}) == 1
        statuses = {labels["route"]: labels["status"] for labels in _series(frontend, "omnigen2_http_requests_total")}
        assert statuses == {"/v1/models": "503", "/v1/chat/completions": "503"}

    asyncio.run(run())


def _get(request: urllib.request.Request, first_line: threading.Event | None = None) -> str:
    """The body read before the connection closed (it may close without an answer); `first_line` is set once the
    body's first line has come."""
    body = b""
    with contextlib.suppress(OSError, http.client.HTTPException), urllib.request.urlopen(request, timeout=30) as answer:
        body = answer.readline()
        if first_line is not None:
            first_line.set()
        body += answer.read()
    return body.decode()


def _pool_threads() -> int:
    return sum(thread.name.startswith("frontend-") for thread in threading.enumerate())


def test_a_stopped_front_end_leaves_no_pool_threads() -> None:
    """Front ends started and stopped in one process (as these tests do) end their pools' threads: before, each
    left its workers, reader and policy threads running for good."""

    async def run() -> None:
        before = _pool_threads()
        for _ in range(3):
            async with in_process_frontend() as (frontend, _):
                service = frontend.service
                for pool in (service.workers, service.readers, service.checkers):
                    await asyncio.wrap_future(pool.submit(time.sleep, 0.05))  # a pool starts its threads when used
                assert _pool_threads() > before
        for _ in range(500):  # an idle thread ends as soon as it sees the shutdown
            if _pool_threads() <= before:
                break
            await asyncio.sleep(0.01)
        assert _pool_threads() <= before, [thread.name for thread in threading.enumerate()]

    asyncio.run(run())


def _trimmer_threads() -> int:
    return sum(thread.name == "idle-trimmer" for thread in threading.enumerate())


def test_a_stopped_front_end_ends_its_memory_trimmer_thread() -> None:
    """Each front end's idle memory trimmer (serving/triton/memory.py) runs a thread; its stop ends it, waiting for it
    (a second at most), so none is left once stop returns. Before, each front end left its own running for good."""

    async def run() -> None:
        before = _trimmer_threads()
        for _ in range(3):
            async with in_process_frontend():
                assert _trimmer_threads() == before + 1
            assert _trimmer_threads() == before, [thread.name for thread in threading.enumerate()]

    asyncio.run(run())

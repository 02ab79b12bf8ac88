"""What SIGTERM's drain reports about the calls its grace period cut: a real front end in process, its backend's
answer never coming (no Triton), and its stop as `serve()` runs it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc
import pytest

from tests.frontends import in_process_frontend, until

GET_MODEL_INFO = "/omnigen2.v1.OmniGen2/GetModelInfo"


def test_the_drain_counts_and_names_the_calls_it_cut_and_ends_after_them(caplog: pytest.LogCaptureFixture) -> None:
    """A call still running when the grace period ends is counted (omnigen2_drain_cut_calls_total{method}), named by
    request id in a warning, and recorded before the stop's last line, which then says no call is in flight. Before,
    the stop returned as soon as gRPC had cancelled the call: "front end stopped: no call in flight" came before the
    cut call's UNAVAILABLE line, with nothing counting it."""
    caplog.set_level(logging.INFO)
    asking = 0

    async def never() -> dict[str, str]:
        nonlocal asking
        asking += 1
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0.5)  # the model confirming the stop, as a cut call waits for it
        raise AssertionError("unreachable")

    async def run() -> tuple[float | None, float | None]:
        async with in_process_frontend(shutdown_grace_s=0.2) as (frontend, channel):
            frontend.backend.model_parameters = never  # type: ignore[method-assign]
            info = channel.unary_unary(GET_MODEL_INFO, lambda b: b, lambda b: b)
            call = info(b"", timeout=30, metadata=(("x-request-id", "cut-by-drain-1"),))
            await until(lambda: asking == 1, "the call to wait on the backend")
            await frontend.drain()
            counted = frontend.metrics.registry.get_sample_value
            at_stop = (
                counted("omnigen2_drain_cut_calls_total", {"method": "GetModelInfo"}),
                counted("omnigen2_requests_total", {"method": "GetModelInfo", "code": "UNAVAILABLE"}),
            )
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await call
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        return at_stop

    assert asyncio.run(run()) == (1, 1)
    lines = [record.getMessage() for record in caplog.records]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "drain" in r.getMessage()]
    assert warnings == ["the drain's grace period (0.2 s) cut 1 call(s) (UNAVAILABLE); request ids: cut-by-drain-1"]
    stopped = lines.index("front end stopped: no call in flight (1 cut by the drain)")
    (cut_line,) = [i for i, line in enumerate(lines) if line.startswith("GetModelInfo ") and "UNAVAILABLE" in line]
    assert cut_line < stopped


def test_a_call_cut_while_its_request_is_still_arriving_is_counted_before_the_stop_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A Generate whose request never comes (the caller sends nothing) waits at the read gate; the grace period
    cuts it there, and it is counted and named as a cut call before the stop's last line."""
    caplog.set_level(logging.INFO)

    async def run() -> float | None:
        async with in_process_frontend(shutdown_grace_s=0.2) as (frontend, channel):
            generate = channel.stream_stream("/omnigen2.v1.OmniGen2/Generate", lambda b: b, lambda b: b)
            silent = asyncio.Event()

            async def nothing() -> AsyncIterator[bytes]:
                await silent.wait()
                yield b""

            call = generate(nothing(), timeout=30, metadata=(("x-request-id", "cut-while-reading"),))
            held = frontend.metrics.registry.get_sample_value
            await until(lambda: held("omnigen2_held_request_bytes", {"budget": "uploads"}), "the read to begin")
            assert len(frontend.service.running) == 1  # registered by the read gate: the stop waits for it
            await frontend.drain()
            counted = frontend.metrics.registry.get_sample_value(
                "omnigen2_drain_cut_calls_total", {"method": "Generate"}
            )
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await call.read()
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        return counted

    assert asyncio.run(run()) == 1
    lines = [record.getMessage() for record in caplog.records]
    assert "the drain's grace period (0.2 s) cut 1 call(s) (UNAVAILABLE); request ids: cut-while-reading" in lines
    assert "front end stopped: no call in flight (1 cut by the drain)" in lines

"""The read gate: its budgets as configured (the default follows admission's count, the other calls' stays small),
and served in process: health ungated, bursts of small calls, the statuses it counts."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from serving.frontend.config import FrontendConfig, MiB
from serving.frontend.metrics import Metrics
from serving.frontend.reading import INLINE_PARSE_BYTES, OTHER_READ_TIMEOUT_S, OTHER_READS, ReadGate


def _gate(config: FrontendConfig) -> ReadGate:
    largest = 2 * config.max_request_bytes
    return ReadGate(frozenset(), config.held_request_budget(), largest, 1.0, 1.0, Metrics(), lambda *_: None)


def test_the_default_budget_reads_as_many_largest_requests_as_admission_admits() -> None:
    config = FrontendConfig()
    gate = _gate(config)
    assert gate.pools["uploads"].budget == (config.max_in_flight + 1) * 2 * config.max_request_bytes
    assert gate.pools["other"].budget == OTHER_READS * 2 * config.max_request_bytes


def test_a_set_budget_is_kept_and_bounds_the_other_calls_too() -> None:
    gate = _gate(FrontendConfig(max_held_request_bytes=256 * MiB, max_request_bytes=64 * MiB))
    assert gate.pools["uploads"].budget == gate.pools["other"].budget == 256 * MiB


METHOD = "/t.Service/Info"  # a gated call other than an upload, like GetModelInfo


async def _echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return b"ok"


@asynccontextmanager
async def _served(
    gate: ReadGate, *options: tuple[str, int], parse: Callable[[bytes], bytes] | None = None
) -> AsyncIterator[grpc.aio.Channel]:
    """An in-process server behind `gate` with the health service and METHOD (its requests parsed by `parse`); a
    channel to it."""
    server = grpc.aio.server(interceptors=[gate], options=options)
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    echo = grpc.unary_unary_rpc_method_handler(_echo, request_deserializer=parse)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.Service", {"Info": echo}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        await server.stop(None)


async def _never() -> AsyncIterator[bytes]:  # the call opens; its one message is never sent
    await asyncio.sleep(3600)
    yield b""


def test_silent_health_checks_do_not_refuse_the_probes() -> None:
    """Health is not gated: before, 4 calls sending only headers held the other calls' budget for
    --request-read-timeout-s and every later probe got RESOURCE_EXHAUSTED (the kubelet restarted the pod)."""
    gate = ReadGate(frozenset(), 64 * MiB, MiB, 120.0, 0.2, Metrics(), lambda *_: None)

    async def run() -> None:
        async with _served(gate) as channel:
            check = "/grpc.health.v1.Health/Check"
            stream = channel.stream_unary(check, health_pb2.HealthCheckRequest.SerializeToString)
            silent = [stream(_never(), timeout=60) for _ in range(2 * OTHER_READS)]
            await asyncio.sleep(0.5)
            probe = health_pb2_grpc.HealthStub(channel).Check
            for _ in range(3):
                answer = await probe(health_pb2.HealthCheckRequest(), timeout=10)
                assert answer.status == health_pb2.HealthCheckResponse.SERVING
            assert gate.pools["other"].held == 0
            for call in silent:
                call.cancel()

    asyncio.run(run())


def test_a_silent_call_other_than_an_upload_ends_after_a_short_read_timeout() -> None:
    """Its request is a few bytes sent at once: it does not keep its reservation for --request-read-timeout-s."""
    gate = ReadGate(frozenset(), 64 * MiB, MiB, 120.0, 0.2, Metrics(), lambda *_: None)

    async def run() -> None:
        async with _served(gate) as channel:
            start = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await channel.stream_unary(METHOD)(_never(), timeout=30)
            assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert f"within {OTHER_READ_TIMEOUT_S:g} s" in (raised.value.details() or "")
            assert time.monotonic() - start < 2 * OTHER_READ_TIMEOUT_S
            assert gate.pools["other"].held == 0

    asyncio.run(run())


def test_a_burst_of_small_calls_waits_for_room_instead_of_being_refused() -> None:
    """200 calls of a byte at once with room for 2 reads: each reserves the largest read, and before, the waiters
    past 32 were refused at once (38 of them measured); now they wait their turn (a few bytes each)."""
    refused: list[grpc.StatusCode] = []
    gate = ReadGate(frozenset(), 2 * MiB, MiB, 120.0, 20.0, Metrics(), lambda *e: refused.append(e[1]))

    async def run() -> None:
        async with _served(gate) as channel:
            call = channel.unary_unary(METHOD)
            answers = await asyncio.gather(*(call(b"y", timeout=60) for _ in range(200)), return_exceptions=True)
            assert answers == [b"ok"] * 200 and refused == []

    asyncio.run(run())


def test_a_request_over_the_transport_cap_is_not_counted_as_one_without_its_request() -> None:
    """grpcio refuses it RESOURCE_EXHAUSTED and the gate's read sees the call end: before, the access log and
    metrics recorded INVALID_ARGUMENT 'ended without its request' for it. A call that really sent none still is."""
    refused: list[grpc.StatusCode] = []
    gate = ReadGate(frozenset({METHOD}), 4 * MiB, 2 * MiB, 10.0, 1.0, Metrics(), lambda *e: refused.append(e[1]))

    async def run() -> None:
        async with _served(gate, ("grpc.max_receive_message_length", MiB)) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await channel.unary_unary(METHOD)(b"x" * 3 * MiB, timeout=10)
            assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await channel.stream_unary(METHOD)(iter(()), timeout=10)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            deadline = time.monotonic() + 5
            while not refused and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)  # the first call's handler, had it counted one, has by now
            # The over-cap call is recorded as one whose caller left (CANCELLED): grpcio's refusal and a caller
            # gone read the same at the gate, and either way it sent no request.
            assert sorted(code.name for code in refused) == ["CANCELLED", "INVALID_ARGUMENT"]
            assert gate.pools["uploads"].held == 0

    asyncio.run(run())


PARSE_S = 1.0  # a large request's parse, standing in for protobuf's on a message of many megabytes


def test_large_requests_are_parsed_off_the_event_loop() -> None:
    """A request of INLINE_PARSE_BYTES or more is parsed on the gate's executor, a smaller one inline: before,
    grpcio parsed every request on the event loop, and health waited for each parse (8 uploads of 100 MiB at once
    kept a probe waiting 2-3 s). The loop's delays are measured while two large requests are parsed."""
    parsed_on: list[bool] = []  # on the event loop's thread?

    def parse(data: bytes) -> bytes:
        parsed_on.append(threading.current_thread() is threading.main_thread())
        if len(data) >= INLINE_PARSE_BYTES:
            time.sleep(PARSE_S)
        return data

    gate = ReadGate(frozenset({METHOD}), 64 * MiB, 4 * MiB, 10.0, 1.0, Metrics(), lambda *_: None)

    async def run() -> float:
        async with _served(gate, parse=parse) as channel:
            call = channel.unary_unary(METHOD)
            assert await call(b"x", timeout=5) == b"ok"
            large = asyncio.gather(*(call(b"x" * INLINE_PARSE_BYTES, timeout=10) for _ in range(2)))
            slowest = 0.0
            while not large.done():
                start = time.monotonic()
                await asyncio.sleep(0.01)
                slowest = max(slowest, time.monotonic() - start - 0.01)
            assert await large == [b"ok", b"ok"]
            health_check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert (await health_check).status == health_pb2.HealthCheckResponse.SERVING
            return slowest

    slowest = asyncio.run(run())
    assert slowest < PARSE_S / 2, f"the event loop stalled {slowest:.2f} s"
    assert parsed_on == [True, False, False], parsed_on


def test_a_cancelled_calls_bytes_stay_counted_until_the_reader_thread_lets_them_go() -> None:
    """Before, a call cancelled while its request was parsed (or queued for the reader thread) gave its reservation
    back at once while the thread still held the bytes: new calls could take that room. A request queued behind the
    parse is skipped once the thread reaches it."""
    parsed: list[int] = []

    def parse(data: bytes) -> bytes:
        parsed.append(len(data))
        time.sleep(PARSE_S)
        return data

    async def run(gate: ReadGate) -> None:
        pool = gate.pools["uploads"]
        both = 2 * INLINE_PARSE_BYTES + 1  # both requests read: the first parsed, the second queued behind it
        async with _served(gate, parse=parse) as channel:
            call = channel.unary_unary(METHOD)
            first = call(b"x" * INLINE_PARSE_BYTES, timeout=10)
            await asyncio.sleep(0.05)
            second = call(b"y" * (INLINE_PARSE_BYTES + 1), timeout=10)
            deadline = time.monotonic() + PARSE_S / 2
            while pool.held != both:
                assert time.monotonic() < deadline, f"{pool.held} bytes held"
                await asyncio.sleep(0.01)
            first.cancel()
            second.cancel()
            await asyncio.sleep(0.1)  # the handlers have ended by now
            assert pool.held == both, "given back while the reader thread holds the bytes"
            deadline = time.monotonic() + 2 * PARSE_S
            while pool.held and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert pool.held == 0
            assert parsed == [INLINE_PARSE_BYTES], "a cancelled call's queued request was parsed"

    with ThreadPoolExecutor(1) as reader:  # one thread, as the front end's (service.readers)
        asyncio.run(
            run(ReadGate(frozenset({METHOD}), 64 * MiB, 4 * MiB, 10.0, 1.0, Metrics(), lambda *_: None, reader))
        )

"""Server keepalive (--grpc-keepalive-time-s, --grpc-keepalive-timeout-s): the connection of a caller that answers
no ping is closed, and with it what gRPC had queued for the caller; a live client's calls are not, however long
they send nothing.

A front end in process with a stand-in backend. The silent caller is tests/test_unary_reply.py's raw HTTP/2 one:
it takes no more of its reply than the initial window and answers no ping, as a frozen process or a vanished network
does not; a gRPC client's transport answers pings whatever its application does.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest
from omnigen2.v1 import omnigen2_pb2 as pb
from omnigen2.v1 import omnigen2_pb2_grpc as pb_grpc

from serving.errors import SettingError
from serving.frontend import server
from serving.frontend.admission import Load
from serving.frontend.config import FrontendConfig, MiB
from serving.frontend.convert import Forward
from serving.frontend.triton_backend import Event, ResultEvent
from tests.frontends import in_process_frontend, until
from tests.test_unary_reply import GENERATE, SilentCaller

QUIET_S = 4.0  # how long a live client's call sends nothing: past several pings and their timeouts
SILENT_S = 6.0  # a silent call long enough for 3 strikes of a client pinging every 1.2 s (GOAWAY at the third)
FROZEN_CALL = threading.Event()  # the frozen client's call has reached the backend
# A gRPC client in its own process, so that it can be frozen (SIGSTOP) with its connection open.
CLIENT = """
import sys, grpc
from omnigen2.v1 import omnigen2_pb2 as pb, omnigen2_pb2_grpc as pb_grpc
stub = pb_grpc.OmniGen2Stub(grpc.insecure_channel(sys.argv[1]))
stub.Generate(pb.GenerateRequest(prompt="frozen", width=64, height=64, steps=1), timeout=120)
"""


async def _result(forward: Forward, *args: object, **kwargs: object) -> AsyncIterator[Event]:
    """Noise at the request's size (it does not compress); a prompt of 'quiet' (or 'silent') first works QUIET_S
    (SILENT_S) in silence."""
    params = forward.params
    if params["prompt"] == "quiet":
        await asyncio.sleep(QUIET_S)
    if params["prompt"] == "silent":
        await asyncio.sleep(SILENT_S)
    if params["prompt"] == "frozen":
        FROZEN_CALL.set()
        await asyncio.sleep(120)
    images = np.random.default_rng(1).integers(0, 256, (1, params["height"], params["width"], 3), dtype=np.uint8)
    yield ResultEvent(1, {}, images, np.zeros(1, np.float32), 0, 0, [])


def _hangs_up(connection: socket.socket, timeout_s: float = 30) -> bool:
    """Whether the server closes the connection within timeout_s (what it still sends is dropped)."""
    connection.settimeout(timeout_s)
    try:
        while connection.recv(1 << 20):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    return True


def test_a_caller_that_answers_no_ping_loses_its_connection_and_a_live_one_does_not() -> None:
    """Before, the silent caller's connection stayed open past the write timeout's cut, gRPC holding the reply for
    it until the kernel gave up on TCP; the call held its place until that cut."""

    FROZEN_CALL.clear()  # set by an earlier run in this process

    async def run() -> None:
        async with in_process_frontend(
            stream_write_timeout_s=60.0,  # the cut of an unread reply is not what frees it here
            grpc_keepalive_time_s=1.0,
            grpc_keepalive_timeout_s=1.0,
        ) as (frontend, _):
            frontend.backend.generate = _result  # type: ignore[method-assign,assignment]
            port = frontend.port
            admission = frontend.service.admission
            large = pb.GenerateRequest(prompt="noise", width=1024, height=1024, steps=1, seed=1)  # about 3 MiB of PNG
            options = [("grpc.max_receive_message_length", 64 * MiB)]
            frozen = subprocess.Popen(
                [sys.executable, "-c", CLIENT, f"127.0.0.1:{port}"],
                env=os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)},
            )
            caller: SilentCaller | None = None
            try:
                # A client frozen while its call works in silence: the call ends with its connection, long before
                # its work would have.
                await until(FROZEN_CALL.is_set, "the frozen client's call", 60)
                os.kill(frozen.pid, signal.SIGSTOP)
                cancelled = {"method": "Generate", "code": "CANCELLED"}
                counted = frontend.metrics.registry.get_sample_value
                await until(
                    lambda: counted("omnigen2_requests_total", cancelled) == 1, "the frozen client's call to end"
                )
                await until(lambda: admission.calls == 0, "the frozen client's place to come back")
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
                    stub = pb_grpc.OmniGen2Stub(channel)
                    # A live client whose call is silent for QUIET_S (a long generation) keeps its connection.
                    quiet = asyncio.ensure_future(
                        stub.Generate(pb.GenerateRequest(prompt="quiet", width=64, height=64, steps=1), timeout=60)
                    )
                    caller = await asyncio.to_thread(SilentCaller, port, GENERATE, large.SerializeToString())
                    await until(caller.replying.is_set, "the reply's first bytes")
                    started = time.monotonic()
                    assert await asyncio.to_thread(_hangs_up, caller.socket), (
                        "the silent caller's connection stayed open"
                    )
                    # About 2 s (a ping and its timeout); 10 leaves room for a loaded box, far below the 60 s cut.
                    assert time.monotonic() - started < 10
                    # Its call is over and its place back, long before the 60 s write timeout.
                    await until(lambda: admission.calls <= 1, "the silent caller's place to come back")
                    served = await quiet
                    assert len(served.images) == 1
                    await until(lambda: admission.calls == 0 and admission.held == Load(), "every place to come back")
                    # The same channel, idle and pinged meanwhile, still serves.
                    again = await stub.Generate(pb.GenerateRequest(prompt="noise", width=64, height=64), timeout=30)
                    assert len(again.images) == 1
            finally:
                frozen.kill()
                frozen.wait()
                if caller is not None:
                    caller.close()

    asyncio.run(run())


@pytest.mark.parametrize(("minimum_ms", "kept"), [(1000, True), (2000, False)])
def test_a_client_pinging_a_little_above_the_minimum_keeps_its_silent_call(
    minimum_ms: int, kept: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scaled down (a client pinging every 1.2 s; gRPC's clients ping at most once a second): with the server's
    minimum a little below that interval, a call silent for SILENT_S, past max_ping_strikes (2) + 1 pings, keeps its
    connection. With the minimum above it, the same client is sent GOAWAY too_many_pings (as a 9 s client was at
    the old 10 s minimum), so the first case does not pass for pings not sent or not judged."""
    monkeypatch.setattr(server, "MIN_CLIENT_PING_INTERVAL_MS", minimum_ms)

    async def run() -> None:
        async with in_process_frontend() as (frontend, _):
            frontend.backend.generate = _result  # type: ignore[method-assign,assignment]
            port = frontend.port
            options = [
                ("grpc.keepalive_time_ms", 1200),
                ("grpc.http2.max_pings_without_data", 0),  # else the client stops pinging after 2 in a silent call
            ]
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
                silent = pb.GenerateRequest(prompt="silent", width=64, height=64, steps=1)
                call = pb_grpc.OmniGen2Stub(channel).Generate(silent, timeout=60)
                if kept:
                    assert len((await call).images) == 1
                else:
                    with pytest.raises(grpc.aio.AioRpcError) as ended:
                        await call
                    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE, ended.value
                    assert ended.value.details() == "Too many pings", ended.value

    asyncio.run(run())


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("grpc_keepalive_time_s", 0.0),
        ("grpc_keepalive_time_s", 0.5),
        ("grpc_keepalive_timeout_s", -1.0),
        ("grpc_keepalive_timeout_s", float("nan")),
        ("grpc_keepalive_time_s", float("inf")),
        ("grpc_keepalive_time_s", 3e6),  # past gRPC's 2^31 - 1 ms
        ("grpc_max_connection_age_s", 0.5),
        ("grpc_max_connection_age_s", -1.0),
        ("grpc_max_connection_age_grace_s", -1.0),
        ("grpc_max_connection_age_grace_s", float("nan")),
    ],
)
def test_connection_settings_out_of_range_are_refused(flag: str, value: float) -> None:
    with pytest.raises(SettingError, match=f"--{flag.replace('_', '-')}"):
        FrontendConfig(**{flag: value})  # type: ignore[arg-type]


def test_a_caller_that_answers_pings_but_takes_nothing_is_closed_past_the_connection_age() -> None:
    """--grpc-max-connection-age-s: keepalive does not end a caller whose transport answers pings; the age does,
    its calls cut after the grace."""
    age_s = 6.0

    async def run() -> None:
        async with in_process_frontend(
            stream_write_timeout_s=60.0,
            grpc_keepalive_time_s=1.0,
            grpc_keepalive_timeout_s=1.0,
            grpc_max_connection_age_s=age_s,
            grpc_max_connection_age_grace_s=1.0,
        ) as (frontend, _):
            frontend.backend.generate = _result  # type: ignore[method-assign,assignment]
            port = frontend.port
            large = pb.GenerateRequest(prompt="noise", width=1024, height=1024, steps=1, seed=1)
            opened = time.monotonic()
            caller = await asyncio.to_thread(SilentCaller, port, GENERATE, large.SerializeToString(), True)
            try:
                await until(caller.replying.is_set, "the reply's first bytes")
                await asyncio.sleep(2.5)  # pinged and answered twice or more
                if time.monotonic() - opened < 0.9 * age_s:  # gRPC jitters the age by 10%; a loaded box may be late
                    assert not caller.gone.is_set(), "keepalive closed a connection that answers pings"
                await until(caller.gone.is_set, "the connection to end past its age")  # its reader still answers pings
                assert await asyncio.to_thread(_hangs_up, caller.socket), "the connection outlived its age"
                await until(lambda: frontend.service.admission.calls == 0, "the caller's place to come back")
            finally:
                caller.close()

    asyncio.run(run())

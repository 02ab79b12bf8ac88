"""A front end whose port is taken stops with the flag to change, instead of sharing the port with the server
that holds it (gRPC's default SO_REUSEPORT would split the callers between the two) or ending in a traceback.
No Triton is needed: the ports are bound before anything calls it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from serving.errors import SettingError
from serving.frontend import socket_dir
from serving.frontend.config import FrontendConfig
from serving.frontend.server import Frontend, serve
from serving.triton.leftovers import pid_namespace
from serving.triton.ports import free_port
from tests.frontends import in_process_frontend


@contextlib.contextmanager
def grpc_server_on(port: int) -> Iterator[None]:
    """Another gRPC server with gRPC's default options, as a first `make serve` would hold the port."""
    server = grpc.server(ThreadPoolExecutor(1))
    assert server.add_insecure_port(f"127.0.0.1:{port}") == port
    server.start()
    try:
        yield
    finally:
        server.stop(0)


@contextlib.contextmanager
def listener_on(port: int) -> Iterator[None]:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        yield


def _start(config: FrontendConfig) -> None:
    async def run() -> None:
        frontend = Frontend(config)
        await frontend.start()
        await frontend.stop()

    asyncio.run(run())


def _config(**changes: object) -> FrontendConfig:
    unused = f"127.0.0.1:{free_port()}"  # health polls it; nothing answers
    fields = {"listen": f"127.0.0.1:{free_port()}", "triton_url": unused, "metrics_port": 0, "shutdown_grace_s": 1.0}
    return FrontendConfig(**{**fields, **changes})  # type: ignore[arg-type]


def _socket_folders() -> set[str]:
    """The folders of the HTTP API's Unix socket (serving/frontend/socket_dir.py) in this machine's temp folder that
    front ends of this process made (named for its pid): not those of front ends that other processes, such as
    another pytest-xdist worker, start meanwhile."""
    own = f"{socket_dir.PREFIX}{pid_namespace()}-{os.getpid()}-"
    return {name for name in os.listdir(tempfile.gettempdir()) if name.startswith(own)}


def test_a_grpc_port_held_by_another_server_is_refused_not_shared() -> None:
    port, before = free_port(), _socket_folders()
    with grpc_server_on(port), pytest.raises(SettingError, match=r"cannot listen on 127\.0\.0\.1:") as refused:
        _start(_config(listen=f"127.0.0.1:{port}", http_listen=f"127.0.0.1:{free_port()}"))
    assert refused.value.setting == "--listen"
    assert _socket_folders() <= before  # the refused front end left no socket folder behind


def test_a_metrics_port_in_use_names_the_flag() -> None:
    port = free_port()
    with listener_on(port), pytest.raises(SettingError, match="Address already in use") as refused:
        _start(_config(metrics_port=port))
    assert refused.value.setting == "--metrics-port"


def test_an_http_port_in_use_names_the_flag_and_stops_the_grpc_server() -> None:
    port, listen = free_port(), free_port()
    with listener_on(port), pytest.raises(SettingError, match="in use") as refused:
        _start(_config(listen=f"127.0.0.1:{listen}", http_listen=f"127.0.0.1:{port}"))
    assert refused.value.setting == "--http-listen"
    with grpc_server_on(listen):  # the refused front end let its gRPC port go
        pass


def test_ready_is_called_once_the_ports_are_bound_and_never_when_one_is_taken() -> None:
    calls: list[str] = []
    port = free_port()
    with grpc_server_on(port), pytest.raises(SettingError):
        asyncio.run(serve(_config(listen=f"127.0.0.1:{port}"), ready=lambda: calls.append("taken")))
    assert calls == []  # make serve prints its banner from here: not for a front end that did not start

    def ready() -> None:
        calls.append("bound")
        os.kill(os.getpid(), signal.SIGTERM)  # serve() drains and returns

    asyncio.run(serve(_config(), ready=ready))
    assert calls == ["bound"]


@pytest.mark.parametrize(
    ("host", "warned"),
    [("127.0.0.2", set()), ("localhost", set()), ("0.0.0.0", {"without TLS", "without --auth-tokens"})],
)
def test_an_http_api_off_loopback_is_warned_about(
    host: str, warned: set[str], caplog: pytest.LogCaptureFixture
) -> None:
    """The warnings and the HTTP API's Host check (serving/frontend/loopback.py) take the same addresses for
    loopback: before, 127.0.0.2 was warned about as without TLS while its Host check took it for loopback."""

    async def run() -> None:
        async with in_process_frontend(http_listen=f"{host}:0"):
            pass

    with caplog.at_level(logging.WARNING, "omnigen2.frontend"):
        asyncio.run(run())
    lines = [record.getMessage() for record in caplog.records if "the HTTP API listens on" in record.getMessage()]
    assert {
        words for words in ("without TLS", "without --auth-tokens") if any(words in line for line in lines)
    } == warned

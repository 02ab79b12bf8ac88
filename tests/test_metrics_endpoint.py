"""The front end's Prometheus port against connections that never finish their request (the attack: 3000 of them
held 3000 threads and files in the front end, for as long as they stayed open): a real front end process, no
Triton; its thread count read with psutil."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from pathlib import Path

import psutil
import pytest

from serving.frontend.process import FrontendProcess
from serving.triton.ports import LOOPBACK, free_port
from tests.frontends import in_process_frontend

BOUND = 4
TIMEOUT_S = 1.0
# Threads the front end may start meanwhile for reasons of its own (gRPC's pollers, the health poll's executor).
OTHER_THREADS = 2


def _threads(pid: int) -> int:
    return psutil.Process(pid).num_threads()


def _settled_threads(pid: int, limit: int, within_s: float = 5.0) -> int:
    """The thread count, read until at most `limit` or for `within_s` (the caller asserts on the last reading): the
    threads that met their timeout may still be exiting on a loaded machine, and a passing run need not wait."""
    deadline, threads = time.monotonic() + within_s, _threads(pid)
    while threads > limit and time.monotonic() < deadline:
        time.sleep(0.1)
        threads = _threads(pid)
    return threads


def _peak_threads(pid: int, samples: int) -> int:
    """The most threads seen in `samples` reads 20 ms apart (the server starts a connection's thread on accept)."""
    peak = 0
    for _ in range(samples):
        time.sleep(0.02)
        peak = max(peak, _threads(pid))
    return peak


def _closed(sock: socket.socket) -> bool:
    """Whether the front end closed `sock` (waits up to 5 s for it)."""
    sock.settimeout(5.0)
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_silent_metrics_connections_hold_at_most_the_bound_of_threads_and_are_closed(tmp_path: Path) -> None:
    flags = ["--no-warmup", f"--metrics-max-connections={BOUND}", f"--metrics-timeout-s={TIMEOUT_S}"]
    with FrontendProcess(f"{LOOPBACK}:{free_port()}", tmp_path / "frontend.log", *flags) as frontend:
        assert frontend.process is not None
        pid = frontend.process.pid
        assert frontend.metric("omnigen2_in_flight_requests") == 0  # served, and its thread back
        before = _threads(pid)
        held = [socket.create_connection((LOOPBACK, frontend.metrics_port), timeout=5.0) for _ in range(40)]
        try:
            for sock in held:
                sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # no blank line: the request never ends
            peak = _peak_threads(pid, samples=20)
            assert peak <= before + BOUND + OTHER_THREADS, (before, peak)
            assert all(_closed(sock) for sock in held)  # past the bound at once, the others at their timeout
        finally:
            for sock in held:
                sock.close()
        assert frontend.metric("omnigen2_in_flight_requests") == 0  # the next scrape is served
        settled = _settled_threads(pid, before + OTHER_THREADS)
        assert settled <= before + OTHER_THREADS, (before, settled)
        assert "Traceback" not in (tmp_path / "frontend.log").read_text()


@pytest.mark.parametrize(("address", "warned"), [("0.0.0.0", True), ("", True), (LOOPBACK, False)])
def test_metrics_on_a_non_loopback_address_are_warned_about(
    address: str, warned: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """As the API is: the metrics port has no TLS nor tokens, so one open beyond loopback says so. "" is every
    address, as the stack's early port check takes it (before, getaddrinfo refused it once Triton had loaded)."""

    async def run() -> None:
        async with in_process_frontend(metrics_address=address, metrics_port=free_port()):
            pass

    with caplog.at_level(logging.WARNING, "omnigen2.frontend"):
        asyncio.run(run())
    assert any(f"the metrics listen on {address}:" in record.getMessage() for record in caplog.records) is warned

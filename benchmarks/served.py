"""The served stack the benchmarks send requests to: Triton on a prepared model repository, the front end before it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from grpc_health.v1 import health_pb2

from serving.frontend.process import FrontendProcess
from serving.triton.launcher import TritonServer
from serving.triton.ports import Ports


@contextmanager
def served(
    repository: Path,
    work: Path,
    *flags: str,
    http: bool = False,
    health_s: float = 60.0,
) -> Iterator[tuple[TritonServer, FrontendProcess]]:
    """Triton on free loopback ports (its files in `work`) and a front end with `flags` (log: `work/frontend.log`;
    the HTTP API too with `http`), yielded once the front end reports SERVING (every model loaded); both are stopped
    on leaving."""
    with (
        triton_started(repository, work) as triton,
        frontend_serving(triton, work, *flags, http=http, health_s=health_s) as api,
    ):
        yield triton, api


@contextmanager
def triton_started(repository: Path, work: Path, start_timeout: float = 180.0) -> Iterator[TritonServer]:
    """Triton on free loopback ports, its files in `work`, once ready (`start_timeout`: loading a full-size model
    takes minutes); stopped on leaving. The first half of `served`, for a benchmark that measures Triton alone."""
    triton = TritonServer(repository, Ports.free(), build_dir=work)
    triton.start(timeout=start_timeout)
    try:
        yield triton
    finally:
        triton.stop()


@contextmanager
def frontend_serving(
    triton: TritonServer, work: Path, *flags: str, http: bool = False, health_s: float = 60.0
) -> Iterator[FrontendProcess]:
    """A front end with `flags` before `triton` (log: `work/frontend.log`; the HTTP API too with `http`), once it
    reports SERVING; stopped on leaving."""
    with FrontendProcess(triton.grpc_url, work / "frontend.log", *flags, http=http) as api:
        api.wait_health(health_pb2.HealthCheckResponse.SERVING, timeout=health_s)
        yield api

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
    repository: Path, work: Path, *flags: str, health_s: float = 60.0
) -> Iterator[tuple[TritonServer, FrontendProcess]]:
    """Triton on free loopback ports (its files in `work`) and a front end with `flags` (log: `work/frontend.log`),
    yielded once the front end reports SERVING (every model loaded); both are stopped on leaving."""
    with (
        TritonServer(repository, Ports.free(), build_dir=work) as triton,
        FrontendProcess(triton.grpc_url, work / "frontend.log", *flags) as api,
    ):
        api.wait_health(health_pb2.HealthCheckResponse.SERVING, timeout=health_s)
        yield triton, api

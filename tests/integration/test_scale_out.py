"""Two full stacks on loopback (two Tritons, two front ends, their own ports) behind one SDK client that balances
over both with gRPC's round_robin: the calls spread, one stack is killed mid-run, and every request still completes
exactly once, on a replica the client names."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2
from omnigen2 import GenerationResult, OmniGen2Client

from serving.frontend.health import LIVENESS, SERVICE
from serving.frontend.process import FrontendProcess
from serving.triton.launcher import TritonServer
from serving.triton.ports import free_port

REQUESTS = 40
SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture
def stack_a(tmp_path: Path, model_repository: Path) -> Iterator[tuple[TritonServer, FrontendProcess]]:
    """The stack this test kills: a Triton of its own, and its front end."""
    with (
        TritonServer(model_repository, build_dir=tmp_path / "triton-a") as triton,
        FrontendProcess(triton.grpc_url, tmp_path / "frontend-a.log", "--server-id=a") as frontend,
    ):
        yield triton, frontend


@pytest.fixture
def stack_b(tmp_path: Path, triton: TritonServer) -> Iterator[FrontendProcess]:
    """The surviving stack: the session's Triton (a second one, on its own ports) and a front end of its own."""
    with FrontendProcess(triton.grpc_url, tmp_path / "frontend-b.log", "--server-id=b") as frontend:
        yield frontend


def test_liveness_stays_serving_while_triton_is_down(tmp_path: Path) -> None:
    """Readiness follows Triton (the pod leaves the Services); liveness is the front end's own (no restart loop), as
    the health probe the images and the Kubernetes manifests use sees them."""
    with FrontendProcess(f"127.0.0.1:{free_port()}", tmp_path / "frontend.log", "--server-id=lonely") as frontend:
        probe = [sys.executable, "-m", "serving.health_probe", f"--address={frontend.address}"]
        assert subprocess.run([*probe, f"--service={LIVENESS}"], timeout=30).returncode == 0
        assert subprocess.run([*probe, f"--service={SERVICE}"], timeout=30).returncode == 1
        assert subprocess.run([*probe, "--service=unknown"], timeout=30).returncode == 1


def _in_flight(frontend: FrontendProcess) -> float:
    value = frontend.metric("omnigen2_in_flight_requests")
    assert value is not None
    return value


def _kill(triton: TritonServer, frontend: FrontendProcess) -> None:
    """SIGKILL, as a node or a container dies: no drain, connections reset."""
    assert frontend.process is not None and triton.process is not None
    frontend.process.kill()
    os.killpg(triton.process.pid, signal.SIGKILL)
    frontend.process.wait()
    triton.process.wait()


def _ok_lines(frontend: FrontendProcess) -> list[str]:
    return re.findall(r"Generate peer=\S+ .*status=OK .*request_id=(\S+)", frontend.log_path.read_text())


def test_requests_spread_and_survive_losing_a_stack(
    stack_a: tuple[TritonServer, FrontendProcess], stack_b: FrontendProcess
) -> None:
    triton_a, a = stack_a
    for frontend in (a, stack_b):
        frontend.wait_health(SERVING)
    client = OmniGen2Client([a.address, stack_b.address], timeout=120)
    options = {"width": 64, "height": 64, "steps": 6}

    def one(i: int) -> GenerationResult:
        return client.generate(f"A lighthouse, variation {i}", seed=1000 + i, **options)  # type: ignore[arg-type]

    with ThreadPoolExecutor(4) as pool:
        futures: list[Future[GenerationResult]] = [pool.submit(one, i) for i in range(REQUESTS)]
        # Kill stack a mid-run: once it has served its 30 % and while it holds admitted calls.
        deadline = time.monotonic() + 60
        while not (sum(f.done() and f.result().served_by == "a" for f in futures) >= 13 and _in_flight(a) > 0):
            assert time.monotonic() < deadline, "stack a never served 13 calls with more in flight"
            assert not all(f.done() for f in futures), "the run ended before stack a could be killed"
            time.sleep(0.02)
        killed_while_in_flight = _in_flight(a)
        _kill(triton_a, a)
        results = [f.result() for f in futures]  # none lost: every call returns a result

    served = Counter(r.served_by for r in results)
    assert set(served) == {"a", "b"}
    assert min(served.values()) >= 0.3 * REQUESTS, served
    assert killed_while_in_flight > 0
    assert [r.seed for r in results] == [1000 + i for i in range(REQUESTS)]  # each answer is its own request's
    assert all(r.images and r.images[0].size == (64, 64) for r in results)
    # None duplicated: each call's request id completed once, on the replica the client names. b writes a call's
    # access-log line just after its response: waited for (a fixed 0.5 s could be too short on a loaded machine).
    deadline = time.monotonic() + 10
    while len(_ok_lines(a)) + len(_ok_lines(stack_b)) < REQUESTS and time.monotonic() < deadline:
        time.sleep(0.05)
    completed = {"a": _ok_lines(a), "b": _ok_lines(stack_b)}
    ids = [rid for lines in completed.values() for rid in lines]
    assert sorted(ids) == sorted(r.request_id for r in results)
    assert all(r.request_id in completed[r.served_by] for r in results)

"""A model's stub process killed under a running call (an OOM kill): Triton never ends the requests it had, so the
front end ends the call UNAVAILABLE once it sees the model reloaded, not at its run time, and gives its slot and
budget back; the reloaded model serves the next call."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2
from omnigen2 import OmniGen2Client, UnavailableError

from serving.frontend.process import FrontendProcess
from serving.triton.cpu_lane import CpuLane
from serving.triton.launcher import TritonServer
from serving.triton.ports import Ports
from serving.triton.watchdog import stub_processes
from tests.integration.lane_locks import lane_locks

SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def shared_triton(tmp_path_factory: pytest.TempPathFactory, model_repository: Path) -> Iterator[TritonServer]:
    """One server for the cases: each ends with the killed model reloaded and serving both calls. Its stop kills it
    half a second after its models unloaded, not EXIT_GRACE_S: Triton counts a model whose stub was killed as live
    until its own exit timeout (TritonServer.stop), so the full grace would only be waited out before the kill."""
    server = TritonServer(model_repository, Ports.free(), build_dir=tmp_path_factory.mktemp("stub-death"))
    try:
        yield server
    finally:
        server.stop(exit_grace_s=0.5)


@pytest.fixture
def own_triton(shared_triton: TritonServer) -> TritonServer:
    """The shared server, started again where a case left it dead (a stub killed at the wrong moment aborts it)."""
    if shared_triton.process is None or shared_triton.process.poll() is not None:
        shared_triton.start()
    return shared_triton


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, shared_triton: TritonServer) -> Iterator[FrontendProcess]:
    """One front end for the cases: each waits for SERVING first, and a Triton started again on the same ports is
    reconnected to by itself (test_faults.py). Its gauges must read 0 after each case, the earlier ones' included."""
    log = tmp_path_factory.mktemp("stub-death-frontend") / "frontend.log"
    with FrontendProcess(shared_triton.grpc_url, log, "--max-run-s=120") as frontend:
        yield frontend


def _stub(server: TritonServer, model: str) -> int:
    assert server.process is not None
    (pid,) = stub_processes(server.process.pid)[model]
    return pid


def _until_waiting_for_the_lane(server: TritonServer, timeout_s: float = 60) -> None:
    """Waits until the `mllm` stub is blocked on the CPU lane's lock (a waiter, `->`, in /proc/locks)."""
    deadline = time.monotonic() + timeout_s
    while "waits" not in lane_locks(server, _stub(server, "mllm")):
        assert time.monotonic() < deadline, "the call never reached the CPU lane"
        time.sleep(0.05)


@pytest.mark.parametrize(("call", "killed"), [("understand", "mllm"), ("generate", "omnigen2"), ("generate", "mllm")])
def test_a_call_whose_model_process_dies_ends_unavailable(
    own_triton: TritonServer, api: FrontendProcess, call: str, killed: str
) -> None:
    """generate/mllm: the BLS waits for its prompt's features, which never come. The stub is killed while it waits
    for the CPU lane the test holds, not while it holds Triton's shared-memory locks (Triton then aborts)."""
    api.wait_health(SERVING, timeout=60)
    client = OmniGen2Client(api.address, timeout=120, retries=0)
    lane = CpuLane(own_triton.model_repository, enabled=True)
    with ThreadPoolExecutor(1) as reader, contextlib.ExitStack() as held:
        held.callback(lane.release)  # a failure before the kill must not leave mllm blocked on the lane
        if call == "understand":
            stream = iter(client.understand_stream("Talk for a long time", max_new_tokens=2048))
            next(stream)
            lane.acquire()
        else:
            lane.acquire()
            stream = iter(client.stream("A prompt not encoded yet", width=32, height=32, steps=2, seed=1))
        # Read beside the kill: the SDK's stream is a generator, which sends its call on the first read only.
        events = reader.submit(list, stream)
        _until_waiting_for_the_lane(own_triton)  # every case's call is then stuck on mllm (the BLS waits for it)
        os.kill(_stub(own_triton, killed), signal.SIGKILL)
        lane.release()
        started = time.monotonic()
        # A generation waiting on mllm is ended by the BLS's watch (component_watch.py); the others by the front end.
        ended_by = "process died under this request" if (call, killed) == ("generate", "mllm") else "process died"
        with pytest.raises(UnavailableError, match=ended_by):
            events.result(timeout=60)
        assert time.monotonic() - started < 20
    assert api.metric("omnigen2_in_flight_requests") == 0
    assert api.metric("omnigen2_admitted_chat_tokens") == 0
    assert api.metric("omnigen2_admitted_step_tokens") == 0
    api.wait_health(SERVING, timeout=60)
    assert client.understand("After", max_new_tokens=2).completion_tokens >= 1
    assert client.generate("After", width=32, height=32, steps=1).images

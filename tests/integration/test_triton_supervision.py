"""A `tritonserver` that dies unasked: reaped, its stubs killed, their shared memory removed, restarted; and the
regions of stubs the watchdog started are removed too."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil
from grpc_health.v1 import health_pb2

from serving.frontend.process import FrontendProcess
from serving.triton.launcher import TritonServer
from serving.triton.leftovers import SHM
from serving.triton.ports import Ports
from serving.triton.watchdog import stub_processes
from tests.processes import alive, stub_shm_regions

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def test_a_killed_triton_is_reaped_cleaned_up_and_restarted(model_repository: Path, tmp_path: Path) -> None:
    gave_up: list[str] = []
    with (
        TritonServer(model_repository, Ports.free(), build_dir=tmp_path) as triton,
        FrontendProcess(triton.grpc_url, tmp_path / "frontend.log") as api,
    ):
        triton.supervise(gave_up.append)
        api.wait_health(SERVING)
        assert triton.process is not None
        first = triton.process.pid
        stubs = set().union(*stub_processes(first).values())
        regions = stub_shm_regions(first)
        assert len(stubs) == 5 and len(regions) == 5
        os.kill(first, signal.SIGKILL)  # the server alone, as the OOM killer does: its stubs are left behind
        api.wait_health(NOT_SERVING, timeout=5)
        api.wait_health(SERVING, timeout=120)  # the same ports, a new server, warmed again by the front end
        assert not psutil.pid_exists(first), "the dead server was not reaped (a zombie)"
        assert not any(alive(pid) for pid in stubs), "the dead server's stubs survived it"
        assert not any((SHM / region).exists() for region in regions)
        assert gave_up == []
    assert not list(SHM.glob(f"{triton.shm_prefix}*"))  # the new server's too, at stop


def test_a_reloaded_stubs_region_is_removed_when_the_server_ends_without_clean_up(
    model_repository: Path, tmp_path: Path
) -> None:
    with TritonServer(model_repository, Ports.free(), build_dir=tmp_path) as triton:
        assert triton.process is not None
        pid = triton.process.pid
        (stub,) = stub_processes(pid)["vae_decoder"]
        os.kill(stub, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while not stub_processes(pid)["vae_decoder"] - {stub}:  # the watchdog's reload started a new one
            assert time.monotonic() < deadline, "vae_decoder was not reloaded"
            time.sleep(0.2)
        regions = stub_shm_regions(pid)
        os.killpg(pid, signal.SIGKILL)  # Triton unlinks nothing
        triton.process.wait()
    assert len(regions) == 5 and not any((SHM / region).exists() for region in regions)

"""A stack killed outright (SIGKILL, the OOM killer) takes its `tritonserver` and the server's stubs with it: the
next start on the same ports finds them free."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from serving.triton import leftovers
from serving.triton.ports import Ports, port_in_use
from serving.triton.watchdog import stub_processes
from tests.processes import alive


def test_a_killed_launcher_takes_its_triton_and_stubs_with_it(model_repository: Path, tmp_path: Path) -> None:
    ports = Ports.free()
    command = [sys.executable, "-m", "serving.triton.launcher", f"--model-repository={model_repository}"]
    command += [f"--http-port={ports.http}", f"--grpc-port={ports.grpc}", f"--metrics-port={ports.metrics}"]
    launcher = subprocess.Popen(
        [*command, f"--build-dir={tmp_path}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    server = 0
    stubs: set[int] = set()
    try:
        assert launcher.stdout is not None
        ready = launcher.stdout.readline()  # once Triton is ready; the launcher's error and exit otherwise
        assert b"tritonserver ready" in ready, ready + launcher.stdout.read()
        (server,) = (child.pid for child in psutil.Process(launcher.pid).children() if child.name() == "tritonserver")
        stubs = set().union(*stub_processes(server).values())
        assert len(stubs) == 5
        launcher.send_signal(signal.SIGKILL)  # as the OOM killer does: no clean-up of its own
        launcher.wait()
        deadline = time.monotonic() + 5
        while alive(server) or any(map(alive, stubs)):
            assert time.monotonic() < deadline, (
                f"alive 5 s after the launcher's death: tritonserver {alive(server)}, "
                f"stubs {sorted(filter(alive, stubs))}"
            )
            time.sleep(0.1)
        assert not any(port_in_use(port) for port in (ports.http, ports.grpc, ports.metrics))
    finally:
        launcher.kill()
        launcher.wait()
        for pid in (server, *stubs):  # only where the test failed: what outlived the launcher
            if pid and alive(pid):
                psutil.Process(pid).kill()
        leftovers.clean_up(leftovers.region_prefix(ports.grpc))  # the killed server's regions

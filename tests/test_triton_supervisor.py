"""The supervisor's bounds, with `sleep` standing in for `tritonserver` (the real restart:
tests/integration/test_triton_supervision.py)."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from serving.triton.launcher import TritonServer
from serving.triton.supervisor import TritonSupervisor


def test_a_server_that_keeps_dying_is_given_up_on(tmp_path: Path) -> None:
    server = TritonServer(tmp_path, build_dir=tmp_path)
    server.process = subprocess.Popen(["sleep", "60"])
    gave_up: list[str] = []
    supervisor = TritonSupervisor(server, gave_up.append, restarts=0, interval_s=0.05)
    server.supervisor = supervisor.start()
    server.process.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + 5
    while not gave_up:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert server.process.returncode == -signal.SIGKILL  # reaped
    assert "tritonserver died 1 times" in gave_up[0] and "giving up" in gave_up[0]
    server.stop()


def test_a_supervisor_that_fails_gives_up_instead_of_stopping_silently(tmp_path: Path) -> None:
    server = TritonServer(tmp_path, build_dir=tmp_path)
    server.process = subprocess.Popen(["sleep", "60"])

    def clean_up() -> None:
        raise PermissionError("/dev/shm/omnigen2_triton_x: not ours")

    server.clean_up = clean_up  # type: ignore[method-assign]
    gave_up: list[str] = []
    supervisor = TritonSupervisor(server, gave_up.append, interval_s=0.05).start()
    server.process.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + 5
    while not gave_up:
        assert time.monotonic() < deadline, "the supervisor ended without giving up"
        time.sleep(0.05)
    assert "supervising tritonserver failed" in gave_up[0] and "not ours" in gave_up[0]
    assert supervisor.gave_up == gave_up[0]
    supervisor.stop()
    server.process.wait()

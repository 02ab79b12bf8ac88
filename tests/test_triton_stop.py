"""How the launcher stops a server that hangs after SIGTERM. A bash stand-in plays the hung `tritonserver` (it
ignores SIGTERM, as Triton does while an unload deadlocks, and writes Triton's log line); the real server's stop is
covered by the integration tests (tests/integration/test_faults.py)."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from serving.triton.launcher import UNLOADING, TritonServer


def _hung_server(tmp_path: Path, say_unloading: bool) -> TritonServer:
    server = TritonServer(tmp_path, log_path=tmp_path / "tritonserver.log")
    server.log_path.write_bytes(b"I1126 started\n")  # before SIGTERM: the launcher reads only what comes after
    line = UNLOADING.decode() if say_unloading else "Waiting for in-flight requests to complete."
    script = f"trap 'echo \"{line}\" >> {server.log_path}' TERM; while :; do sleep 0.05; done"
    server.process = subprocess.Popen(["bash", "-c", script], start_new_session=True)
    time.sleep(0.3)  # the trap is set
    return server


def test_a_server_stuck_unloading_is_killed_after_the_grace(tmp_path: Path) -> None:
    server = _hung_server(tmp_path, say_unloading=True)
    started = time.monotonic()
    server.stop(timeout=30, unload_grace_s=0.5)
    assert time.monotonic() - started < 5
    assert server.process is not None and server.process.returncode == -signal.SIGKILL


def test_a_server_still_draining_gets_the_whole_timeout(tmp_path: Path) -> None:
    server = _hung_server(tmp_path, say_unloading=False)
    started = time.monotonic()
    server.stop(timeout=2, unload_grace_s=0.1)
    assert 2 <= time.monotonic() - started < 10
    assert server.process is not None and server.process.returncode == -signal.SIGKILL

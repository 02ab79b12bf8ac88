"""How the launcher stops a server that hangs after SIGTERM. A bash stand-in plays the hung `tritonserver` (it
ignores SIGTERM, as Triton does while an unload deadlocks, and writes Triton's log line); the real server's stop is
covered by the integration tests (tests/integration/test_faults.py)."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from serving.triton.launcher import UNLOADING, TritonServer


def _hung_server(tmp_path: Path, say_unloading: bool, unloaded: tuple[str, ...] = ()) -> TritonServer:
    """A stand-in serving a repository of models `a` and `b` that, on SIGTERM, logs the `unloaded` ones."""
    for model in ("a", "b"):
        (tmp_path / "repository" / model).mkdir(parents=True)
        (tmp_path / "repository" / model / "config.pbtxt").write_text(f'name: "{model}"\n')
    server = TritonServer(tmp_path / "repository", log_path=tmp_path / "tritonserver.log")
    # Before SIGTERM, which the launcher reads only after: a model loaded and unloaded (a watchdog's reload) earlier.
    server.log_path.write_bytes(b"I1126 started\nI1126 \"successfully unloaded 'a' version 1\"\n")
    lines = [UNLOADING.decode() if say_unloading else "Waiting for in-flight requests to complete."]
    lines += [f"successfully unloaded '{model}' version 1" for model in unloaded]
    (tmp_path / "on-term.log").write_text("".join(f"{line}\n" for line in lines))
    script = f"trap 'cat {tmp_path / 'on-term.log'} >> {server.log_path}' TERM; while :; do sleep 0.05; done"
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


def test_a_server_whose_models_all_unloaded_is_killed_soon(tmp_path: Path) -> None:
    """Triton counts a model whose stub was killed as live: it would exit only at its own exit timeout (30 s)."""
    server = _hung_server(tmp_path, say_unloading=True, unloaded=("a", "b"))
    started = time.monotonic()
    server.stop(timeout=30, unload_grace_s=20, exit_grace_s=0.5)
    assert time.monotonic() - started < 3
    assert server.process is not None and server.process.returncode == -signal.SIGKILL


def test_a_server_with_a_model_still_unloading_gets_the_grace(tmp_path: Path) -> None:
    server = _hung_server(tmp_path, say_unloading=True, unloaded=("b",))
    started = time.monotonic()
    server.stop(timeout=30, unload_grace_s=2)
    assert 2 <= time.monotonic() - started < 10

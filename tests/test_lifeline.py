"""serving/triton/lifeline.py: a child ends with its parent process, not with the thread that asked for it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from serving.triton import lifeline
from tests.processes import alive


def _wait_exec(pid: int, name: str) -> None:
    """Until the child runs `name`: its parent-death signal is set."""
    deadline = time.monotonic() + 5
    while psutil.Process(pid).name() != name:
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_a_child_started_from_a_thread_that_ended_lives_on() -> None:
    started: list[lifeline.Popen] = []

    def restart() -> None:  # as the supervisor's, from its thread that ends at stop()
        started.append(lifeline.popen(["sleep", "30"]))
        _wait_exec(started[0].pid, "sleep")

    thread = threading.Thread(target=restart)
    thread.start()
    thread.join()
    (child,) = started
    try:
        time.sleep(0.3)
        assert child.poll() is None, "the child was killed as the thread that asked for it ended"
    finally:
        child.kill()
        child.wait()


def test_a_child_ends_with_its_killed_parent() -> None:
    code = "from serving.triton import lifeline; print(lifeline.popen(['sleep', '30']).pid, flush=True); input()"
    parent = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    try:
        _wait_exec(child, "sleep")
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 2
        while alive(child):
            assert time.monotonic() < deadline, "the child outlived its killed parent"
            time.sleep(0.05)
    finally:
        parent.kill()
        parent.wait()
        if alive(child):
            os.kill(child, signal.SIGKILL)


def test_a_child_whose_parent_ended_before_the_signal_was_set_does_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    assert os.getpid() != 1
    # The pid it was started for is not its parent's: that parent ended and the child was reparented meanwhile.
    script = lifeline.__file__
    ended = subprocess.run([sys.executable, "-I", "-S", script, "1", "touch", str(marker)], capture_output=True)
    assert ended.returncode != 0 and b"its parent (pid 1) has ended" in ended.stderr
    assert not marker.exists()

"""The CPU lane lets one component compute at a time, across lane objects (processes) of one repository."""

from __future__ import annotations

import fcntl
import threading
import time
from pathlib import Path

import pytest
import torch

from serving.triton.cpu_lane import LOCK_FILE, CpuLane


def test_a_second_holder_waits_for_the_first(tmp_path: Path) -> None:
    first, second = CpuLane(tmp_path, enabled=True), CpuLane(tmp_path, enabled=True)
    order: list[str] = []

    def contender() -> None:
        with second:
            order.append("second")

    with first:
        thread = threading.Thread(target=contender)
        thread.start()
        time.sleep(0.2)  # the contender is blocked on the lock by now
        order.append("first done")
    thread.join(timeout=5)
    assert order == ["first done", "second"]
    assert (tmp_path / LOCK_FILE).is_file()


def test_a_disabled_lane_never_blocks(tmp_path: Path) -> None:
    finished = threading.Event()

    def nested() -> None:
        with CpuLane(tmp_path, enabled=True), CpuLane(tmp_path, enabled=False):
            finished.set()  # a disabled lane that took the lock would block here forever

    threading.Thread(target=nested, daemon=True).start()
    assert finished.wait(timeout=5)


def test_around_forward_holds_the_lane_per_call_and_releases_on_errors(tmp_path: Path) -> None:
    class Probe(torch.nn.Module):
        def forward(self, fail: bool) -> bool:
            if fail:
                raise RuntimeError("forward failed")
            return holds_the_lane(tmp_path)

    probe = Probe()
    CpuLane(tmp_path, enabled=True).around_forward(probe)
    assert probe(False) is True  # another holder is locked out during the forward pass
    with pytest.raises(RuntimeError):
        probe(True)
    assert not holds_the_lane(tmp_path)  # released after both calls, the failed one included


def holds_the_lane(repository: Path) -> bool:
    """Whether someone else holds the lane: a non-blocking try from a separate open file."""
    with open(repository / LOCK_FILE, "a") as other:
        try:
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(other, fcntl.LOCK_UN)
        return False

"""The CPU lane lets one component compute at a time, across lane objects (processes) of one repository."""

from __future__ import annotations

import threading
import time
from pathlib import Path

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

"""The BLS's watch over a streaming component's call (serving/triton/component_watch.py), with real processes standing
in for the stubs: children of this process whose command line is a model's `model.py`, as Triton's are of
`tritonserver`. The served case (a real `mllm` stub killed under a generation) is tests/integration/test_stub_death.py.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from serving.errors import ComponentDiedError
from serving.triton import component_watch
from serving.triton.component_watch import StubWatch, drained_on_thread, until_answered
from serving.triton.watchdog import ticks_since_boot

TICK_S = 1 / os.sysconf("SC_CLK_TCK")


class Stubs:
    """Stand-in stub processes of one model, children of this process."""

    def __init__(self, repository: Path, model: str) -> None:
        self.script = repository / model / "1" / "model.py"
        self.script.parent.mkdir(parents=True)
        self.script.write_text("import time\ntime.sleep(120)\n")
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        self.processes.append(subprocess.Popen([sys.executable, str(self.script), "region"]))
        time.sleep(3 * TICK_S)  # its start time, in clock ticks, is then before what the test reads next

    def kill_all(self) -> None:
        for process in self.processes:
            process.kill()
            process.wait()


@pytest.fixture
def stubs(tmp_path: Path) -> Iterator[Stubs]:
    started = Stubs(tmp_path, "mllm")
    try:
        yield started
    finally:
        started.kill_all()


def lost_at_first_look(model: str, since: int) -> bool:
    return StubWatch(model, since, os.getpid()).lost()


def test_a_call_is_lost_once_its_models_stubs_are_gone_or_replaced(stubs: Stubs) -> None:
    stubs.start()
    since = ticks_since_boot()
    assert not lost_at_first_look("mllm", since)  # the stub that has the call is alive
    assert lost_at_first_look("transformer", since)  # a model with no stub cannot answer
    stubs.kill_all()
    assert lost_at_first_look("mllm", since)  # died, reload not yet begun
    stubs.start()
    assert lost_at_first_look("mllm", since)  # reloaded: the new stub never had the call
    assert not lost_at_first_look("mllm", ticks_since_boot())  # a call sent after the reload is fine


def test_later_looks_follow_the_stubs_of_the_first(stubs: Stubs) -> None:
    """Two instances (one per GPU): one dying is the call's end (the watchdog reloads both), though another model
    process starting meanwhile is not; looks after the first read only the stubs it found."""
    stubs.start()
    stubs.start()
    watch = StubWatch("mllm", ticks_since_boot(), os.getpid())
    assert not watch.lost() and not watch.lost()
    other = Stubs(stubs.script.parents[2], "transformer")
    try:
        other.start()
        assert not watch.lost()
    finally:
        other.kill_all()
    stubs.processes[0].kill()
    stubs.processes[0].wait()
    assert watch.lost()


def test_a_wait_ends_when_the_stub_dies_and_not_before(stubs: Stubs, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(component_watch, "POLL_S", 0.05)
    stubs.start()

    async def run() -> None:
        never: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        waiting = asyncio.ensure_future(until_answered(lambda: never, "mllm", os.getpid()))
        await asyncio.sleep(0.3)  # several polls with the stub alive
        assert not waiting.done()
        stubs.kill_all()
        with pytest.raises(ComponentDiedError, match="the mllm model's process died under this request"):
            await asyncio.wait_for(waiting, 5)
        assert never.cancelled()

        async def answer() -> int:
            await asyncio.sleep(0.2)
            return 7

        stubs.start()
        assert await until_answered(answer, "mllm", os.getpid()) == 7

    asyncio.run(run())


def test_responses_are_drained_on_a_thread_of_their_own() -> None:
    """Responses that never end (a dead stub's) block threads of their own: more of them than the event loop's
    shared workers still leave those free. Errors reach the waiter."""
    release = threading.Event()

    def stuck() -> Iterator[int]:
        release.wait()
        yield 1

    def failing() -> Iterator[int]:
        yield 1
        raise ValueError("broken stream")

    async def run() -> None:
        assert await drained_on_thread(iter([1, 2, 3]), "test-responses") == [1, 2, 3]
        with pytest.raises(ValueError, match="broken stream"):
            await drained_on_thread(failing(), "test-responses")
        shared = ThreadPoolExecutor(2)
        asyncio.get_running_loop().set_default_executor(shared)
        blocked = [asyncio.ensure_future(drained_on_thread(stuck(), "test-responses")) for _ in range(3)]
        try:
            assert await asyncio.wait_for(asyncio.to_thread(lambda: 7), 5) == 7
        finally:
            release.set()
        assert await asyncio.gather(*blocked) == [[1]] * 3

    asyncio.run(run())

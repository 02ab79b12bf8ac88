"""The BLS's wait on a streaming component (`mllm`), ended when the component's stub process dies under it.

Triton's Python backend fails a request to a dead stub ("Stub process ... is not healthy"), but a decoupled model's
request already running when its stub is killed (an OOM kill) gets no response and no end: a generation whose prompt
`mllm` was encoding waited until the front end's --max-run-s, holding its place, and the BLS's wait never ended. So
while the BLS waits on such a call it looks, every POLL_S, at the model's stub processes (children of the same
tritonserver, found as serving/triton/watchdog.py finds them): none left, one started after the call (the
watchdog's reload), or one gone since the first look means the process that had the request is gone, and the call
fails with ComponentDiedError, which the caller sees as UNAVAILABLE (retryable).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

from serving.errors import ComponentDiedError
from serving.triton.watchdog import proc_stat, stub_processes, ticks_since_boot

T = TypeVar("T")
# How often a waiting call looks at its component's processes: a /proc scan the first time, then only those found.
POLL_S = 1.0


class StubWatch:
    """Whether the stub process that has a request sent to `model` at `since` (ticks_since_boot) can still answer.

    The first look scans /proc for the model's stubs: none, or one started after the request (the watchdog's reload
    replaces them all), means no. It keeps the stubs it found, and later looks read only those: one gone, or its pid
    now another process's, means no. With several instances (one per GPU) the request's own may live on: it is
    given up too (UNAVAILABLE, retryable), as the watchdog is about to reload every instance of the model."""

    def __init__(self, model: str, since: int, server_pid: int) -> None:
        self.model = model
        self.since = since
        self.server_pid = server_pid
        self.stubs: dict[int, int] | None = None  # pid -> its start, from the first look

    def lost(self) -> bool:
        if self.stubs is None:
            self.stubs = {}
            for pid in stub_processes(self.server_pid).get(self.model, ()):
                with contextlib.suppress(OSError):  # ended since the scan: left out, so none may be left
                    self.stubs[pid] = proc_stat(pid).started
            return not self.stubs or max(self.stubs.values()) >= self.since
        return not all(_same_process(pid, started) for pid, started in self.stubs.items())


def _same_process(pid: int, started: int) -> bool:
    try:
        stat = proc_stat(pid)
    except OSError:
        return False
    return stat.state != "Z" and stat.started == started


async def until_answered(send: Callable[[], Awaitable[T]], model: str, server_pid: int | None = None) -> T:
    """What `send()` (the call to `model`) returns; ComponentDiedError once the stub process that has it is gone.
    `server_pid`: the tritonserver whose children the stubs are (this process's parent, the BLS being one)."""
    since = ticks_since_boot()  # before the request leaves: a stub started after it cannot have it
    watch = StubWatch(model, since, os.getppid() if server_pid is None else server_pid)
    answer = asyncio.ensure_future(send())
    try:
        while True:
            done, _ = await asyncio.wait({answer}, timeout=POLL_S)
            if done:
                return answer.result()
            if watch.lost():
                raise ComponentDiedError(f"the {model} model's process died under this request; retry the call")
    finally:
        answer.cancel()  # given up, or this wait cancelled: nothing is left to take the answer


async def drained_on_thread(responses: Iterable[T], name: str) -> list[T]:
    """list(responses) on a thread of its own, not the event loop's shared workers: a dead stub's iterator never
    ends, and the thread blocked on it would hold one of them for good (as this one is: one thread per call a stub
    died under)."""
    loop = asyncio.get_running_loop()
    drained: asyncio.Future[list[T]] = loop.create_future()

    def settle(result: list[T] | None, error: BaseException | None) -> None:
        if drained.done():  # the waiter gave up (until_answered)
            return
        if error is not None:
            drained.set_exception(error)
        else:
            drained.set_result(result or [])

    def drain() -> None:
        try:
            result, error = list(responses), None
        except BaseException as exc:  # handed to the waiter, which would otherwise wait for good
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=drain, name=name, daemon=True).start()
    return await drained

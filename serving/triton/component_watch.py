"""The BLS's wait on a streaming component (`mllm`), ended when the component's stub process dies under it.

Triton's Python backend fails a request to a dead stub ("Stub process ... is not healthy"), but a decoupled model's
request already running when its stub is killed (an OOM kill) gets no response and no end: a generation whose prompt
`mllm` was encoding waited until the front end's --max-run-s, holding its place, and the BLS's wait never ended. So
while the BLS waits on such a call it looks, every POLL_S, at the model's stub processes (children of the same
tritonserver, found as serving/triton/watchdog.py finds them): none left, or one started after the call (the
watchdog's reload), means the process that had the request is gone, and the call fails with ComponentDiedError,
which the caller sees as UNAVAILABLE (retryable).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

from serving.triton.watchdog import proc_stat, stub_processes, ticks_since_boot

T = TypeVar("T")
# How often a waiting call looks for its component's process: one /proc scan each, only while a call waits.
POLL_S = 1.0


class ComponentDiedError(RuntimeError):
    """The component's stub process died with the request: the call may be retried once the watchdog has loaded
    the model again."""


def stub_lost(model: str, since: int, server_pid: int) -> bool:
    """Whether `model` has no stub process left from before `since` (ticks_since_boot) to answer a request sent
    then: it has none, or one started later (a reload replaces them all)."""
    started = []
    for pid in stub_processes(server_pid).get(model, ()):
        with contextlib.suppress(OSError):  # ended since the scan
            started.append(proc_stat(pid).started)
    return not started or max(started) >= since


async def until_answered(send: Callable[[], Awaitable[T]], model: str, server_pid: int | None = None) -> T:
    """What `send()` (the call to `model`) returns; ComponentDiedError once the stub process that has it is gone.
    `server_pid`: the tritonserver whose children the stubs are (this process's parent, the BLS being one)."""
    since = ticks_since_boot()  # before the request leaves: a stub started after it cannot have it
    server = os.getppid() if server_pid is None else server_pid
    answer = asyncio.ensure_future(send())
    while True:
        done, _ = await asyncio.wait({answer}, timeout=POLL_S)
        if done:
            return answer.result()
        if stub_lost(model, since, server):
            answer.cancel()
            raise ComponentDiedError(f"the {model} model's process died under this request; retry the call")


async def drained_on_thread(responses: Iterable[T], name: str) -> list[T]:
    """list(responses) on a thread of its own, not the event loop's shared workers: a dead stub's iterator never
    ends, and the thread blocked on it would hold one of them for good."""
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
        except Exception as exc:  # handed to the waiter
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=drain, name=name, daemon=True).start()
    return await drained

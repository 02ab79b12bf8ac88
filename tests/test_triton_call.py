"""A finished Triton stream is read to its end in the background (serving/frontend/triton_call.py, StreamDrains):
the caller's answer does not wait for Triton to close the stream, dropping it would cancel it (which hangs Triton
2.51's unload, docs/reliability.md), and the front end's close waits for such reads, each for a bounded time.
The Triton client is a stand-in here: tests/integration/test_faults.py runs the real one."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
import pytest

from serving.frontend.status import ApiError, plain
from serving.frontend.triton_call import StreamDrains, TritonCall, Unbuffered


class Result:
    def as_numpy(self, name: str) -> np.ndarray:
        assert name == "event"
        return np.array([json.dumps({"type": "result"}).encode()], dtype=np.object_)


class Stream:
    """Answers with one final result; then ends only when `ends` is set (Triton ends a stream once its request side
    closes), or not at all."""

    def __init__(self, ends: bool) -> None:
        self.ends = ends
        self.reads_after_answer = 0
        self.finished = asyncio.Event()
        self.answered = False

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> tuple[Result, None]:
        if not self.answered:
            self.answered = True
            return Result(), None
        self.reads_after_answer += 1
        if self.ends:
            self.finished.set()
            raise StopAsyncIteration
        await asyncio.Event().wait()  # never
        raise AssertionError


class Client:
    def __init__(self, stream: Stream) -> None:
        self.stream = stream

    def stream_infer(self, requests: AsyncIterator[dict[str, Any]], stream_timeout: float) -> Stream:
        return self.stream


def _error(*_: Any) -> ApiError:
    return plain(grpc.StatusCode.INTERNAL, "unexpected")


async def _answer(stream: Stream, drains: StreamDrains) -> float:
    """Seconds until the call's generator has ended with the final event."""
    call = TritonCall(Client(stream), "omnigen2", [], "rid", _error, _error, drains)
    started = time.monotonic()
    events = [payload["type"] async for payload, _ in call.responses(5.0, 1.0, Unbuffered(), lambda: None)]
    assert events == ["result"]
    return time.monotonic() - started


@pytest.mark.parametrize("ends", [True, False], ids=["ends", "never-ends"])
def test_the_answer_does_not_wait_for_the_end_of_the_stream(ends: bool) -> None:
    async def run() -> None:
        stream, drains = Stream(ends), StreamDrains(limit_s=1.0)
        assert await _answer(stream, drains) < 0.5  # well inside limit_s
        started = time.monotonic()
        await drains.close()
        waited = time.monotonic() - started
        assert stream.reads_after_answer == 1  # read on after the answer, not dropped
        if ends:
            assert stream.finished.is_set() and waited < 0.5
        else:
            assert 0.9 < waited < 3.0  # bounded: a stream Triton never ends is dropped after limit_s

    asyncio.run(run())


def test_close_with_nothing_to_read_returns_at_once() -> None:
    async def run() -> None:
        drains = StreamDrains()
        started = time.monotonic()
        await drains.close()
        assert time.monotonic() - started < 0.1

    asyncio.run(run())

"""A gRPC stream's writes (serving/frontend/outbox.py) with a stand-in for the call's context: a caller that takes
each message just within the write timeout is cut off once it is behind --stream-min-write-rate, one reading a
large message slowly but steadily is not, and one reading nothing still is."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from omnigen2.v1 import omnigen2_pb2 as pb

from serving.frontend.outbox import Outbox
from serving.frontend.status import ApiError


class Caller:
    """A call's context that takes each message `seconds` in, or at `rate` bytes/s; neither: never."""

    def __init__(self, seconds: float = 0.0, rate: float = 0.0) -> None:
        self.seconds, self.rate = seconds, rate
        self.written = 0

    async def write(self, message: Any) -> None:
        taking = self.seconds + message.ByteSize() / self.rate if self.rate else self.seconds
        await asyncio.sleep(taking if taking or self.rate else 3600)
        self.written += 1


def _write(caller: Caller, sizes: list[int], timeout_s: float, min_rate: float) -> tuple[ApiError | None, list[str]]:
    """Writes deltas of `sizes` characters; the error that ended the stream (None: none) and the cut-offs counted."""
    cut_off: list[str] = []

    async def run() -> ApiError | None:
        outbox = Outbox(1 << 30, timeout_s, min_rate, cut_off.append)
        try:
            for size in sizes:
                await outbox.write(caller, pb.UnderstandEvent(delta="x" * size))
        except ApiError as error:
            return error
        return None

    return asyncio.run(run()), cut_off


def test_a_caller_taking_each_message_just_in_time_is_cut_off_once_behind_the_rate() -> None:
    """Each 20-byte message taken 0.15 s in, within the 0.2 s timeout: before, all 20 were written (3 s)."""
    caller = Caller(seconds=0.15)
    error, cut_off = _write(caller, [20] * 20, timeout_s=0.2, min_rate=10_000)
    assert error is not None and error.code == grpc.StatusCode.CANCELLED
    assert "slower than 10000 bytes/s" in error.status.details
    assert cut_off == ["slow"] and caller.written == 1


def test_a_large_message_read_slowly_but_steadily_is_written() -> None:
    """1 MB taken in 0.5 s (2 MB/s), above the 1 MB/s minimum, past the 0.2 s timeout: before, cut off at 0.2 s."""
    caller = Caller(rate=2_000_000)
    error, cut_off = _write(caller, [1_000_000, 10], timeout_s=0.2, min_rate=1_000_000)
    assert error is None and cut_off == [] and caller.written == 2


def test_a_caller_reading_nothing_is_cut_off_after_the_timeout() -> None:
    caller = Caller()
    error, cut_off = _write(caller, [100], timeout_s=0.2, min_rate=1_000_000)
    assert error is not None and error.code == grpc.StatusCode.CANCELLED
    assert "read nothing" in error.status.details
    assert cut_off == ["stalled"]


@pytest.mark.parametrize("rate", [10_000, 1_000_000])
def test_a_prompt_caller_is_never_cut_off(rate: int) -> None:
    """Many small messages taken at once: the writes' waits, not the stream's time, are what the rate is of."""
    error, cut_off = _write(Caller(rate=1e9), [50] * 200, timeout_s=0.2, min_rate=rate)
    assert error is None and cut_off == []

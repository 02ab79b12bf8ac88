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
    """A call's context that takes each message `seconds` in, or at `rate` bytes/s; neither: never. Every `every`th
    message is taken `late_s` later (the event loop busy elsewhere)."""

    def __init__(self, seconds: float = 0.0, rate: float = 0.0, every: int = 0, late_s: float = 0.0) -> None:
        self.seconds, self.rate, self.every, self.late_s = seconds, rate, every, late_s
        self.written = 0

    async def write(self, message: Any) -> None:
        taking = self.seconds + message.ByteSize() / self.rate if self.rate else self.seconds
        if self.every and self.written % self.every == self.every - 1:
            taking += self.late_s
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
    """Each 20-byte message taken 0.6 s in, within the 1 s timeout (0.47 s to spare): the second write is cut off
    0.53 s in (0.6 s of the first, less 0.05 s taken at once, against 1 s and 2 x 16 KiB at 1 MB/s), however late
    the loop runs each. Before, all 5 were written (3 s)."""
    caller = Caller(seconds=0.6)
    error, cut_off = _write(caller, [20] * 5, timeout_s=1.0, min_rate=1_000_000)
    assert error is not None and error.code == grpc.StatusCode.CANCELLED
    assert "slower than 1e+06 bytes/s" in error.status.details
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


def test_writes_taken_at_once_but_late_are_not_the_callers() -> None:
    """400 tokens, each write 5 ms late (the event loop busy elsewhere), against a 0.3 s grace at 32 KiB/s: before,
    cut off as slow at the 60th (a token's 20 bytes earned 0.6 ms)."""
    caller = Caller(seconds=0.005)
    error, cut_off = _write(caller, [20] * 400, timeout_s=0.3, min_rate=32 * 1024)
    assert error is None and cut_off == [] and caller.written == 400


def test_a_small_message_earns_at_least_16_kib_of_the_rate() -> None:
    """Every 5th token 0.25 s late (the loop parsing an upload): 0.2 s of it the caller's by the time, but a
    token earns 0.5 s at 32 KiB/s; before, it earned 0.6 ms and the second late write was cut off."""
    caller = Caller(seconds=0.001, every=5, late_s=0.25)
    error, cut_off = _write(caller, [20] * 30, timeout_s=0.3, min_rate=32 * 1024)
    assert error is None and cut_off == [] and caller.written == 30

"""What a streaming call has received from Triton and not yet written to its caller, bounded in time and bytes.

A caller that stops reading stalls the call's writes once gRPC's flow-control window is full. Its output then
waits here (the Triton stream is read eagerly, so Triton buffers nothing): a write that waits too long ends the call
CANCELLED, and output waiting behind the write past the byte cap ends it at once, RESOURCE_EXHAUSTED. Either way
the call's Triton request is stopped and its slot given back once it has stopped.

A write is seen whole (gRPC does not tell how much of a message the caller has taken), so it may wait the write
timeout plus its message's time at the minimum rate: a slow but steady reader gets a result of megabytes, at a
cost, that one reading nothing of it holds its slot that much longer. Past that, the stream's writes are held to the
minimum rate with the write timeout as grace (pace.py), the bytes of each message counted once it is written.

Each message is credited with at least MIN_CREDIT_BYTES at the minimum rate: a token's 20 bytes earned 0.6 ms at
32 KiB/s, so a prompt reader of a 2048-token answer was cut off as slow once its writes took 15 ms on average (the
event loop busy elsewhere: grpcio's copy of a 100 MiB upload out of its buffers takes it about 0.1 s; the parse is
off the loop, reading.py, but holds the GIL).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc
from google.protobuf.message import Message

from serving.frontend.pace import TAKEN_AT_ONCE_S, Pace
from serving.frontend.status import ApiError, make_status

MIN_CREDIT_BYTES = 16 * 1024  # 0.5 s at the default 32 KiB/s: more than the loop's longest pause on a write


class CutOffError(ApiError):
    """The call's end when its caller stopped taking its writes. gRPC sends the status after the data written, so
    it waits on that caller too: the handler ends without waiting for it (service.py). `unsent` is the message a
    write had handed to gRPC when it was cut: it stays queued in gRPC core until that status goes out."""

    def __init__(self, code: grpc.StatusCode, message: str, unsent: Message | None = None) -> None:
        super().__init__(make_status(code, message))
        self.unsent = unsent


class Outbox:
    def __init__(
        self,
        max_bytes: int,
        write_timeout_s: float,
        min_rate: float,
        on_cut_off: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self.max_bytes = max_bytes
        self.pace = Pace(write_timeout_s, min_rate)
        self.on_cut_off = on_cut_off  # "stalled" or "slow", for the metrics
        self.sent = 0  # bytes of the messages written
        self.credited = 0  # the bytes they are credited with (each at least MIN_CREDIT_BYTES)
        self.waiting = 0  # bytes received and not yet handed to a write
        self.overflowed = False
        self._write: asyncio.Timeout | None = None  # the write in progress, ended early on an overflow

    def hold(self, nbytes: int) -> None:
        self.waiting += nbytes
        if self.waiting > self.max_bytes and not self.overflowed:
            self.overflowed = True
            if self._write is not None:
                self._write.reschedule(asyncio.get_running_loop().time())

    def release(self, nbytes: int) -> None:
        self.waiting -= nbytes

    async def write(self, context: grpc.aio.ServicerContext, message: Message) -> None:
        size = message.ByteSize()
        credit = max(size, MIN_CREDIT_BYTES)
        timeout_s, min_rate = self.pace.grace_s, self.pace.min_rate
        own = timeout_s + credit / min_rate  # this write's time, however far ahead of the rate the stream is
        spare = self.pace.spare(self.credited + credit)
        allowed = min(own, spare) + TAKEN_AT_ONCE_S
        try:
            self._check()
            # In this task, not a wait_for task: when the caller cancels, this task is cancelled (CANCELLED), where
            # a separate write task failed with grpcio's ExecuteBatchError and the call was logged as INTERNAL.
            with self.pace.waiting():
                async with asyncio.timeout(allowed) as self._write:
                    await context.write(message)
        except TimeoutError:
            self._check(message)
            slow = spare < own
            self.on_cut_off("slow" if slow else "stalled")
            if slow:
                text = (
                    f"the caller reads slower than {min_rate:g} bytes/s (--stream-min-write-rate): {self.sent} "
                    f"bytes in {self.pace.waited:.3g} s of writes, past a {timeout_s:g} s grace"
                )
            else:
                text = (
                    f"the caller read nothing, or too little, for {allowed:.3g} s (--stream-write-timeout-s, and a "
                    f"message's time, of at least {MIN_CREDIT_BYTES} bytes, at --stream-min-write-rate)"
                )
            raise CutOffError(grpc.StatusCode.CANCELLED, text, message) from None
        finally:
            self._write = None
        self.sent += size
        self.credited += credit

    def _check(self, unsent: Message | None = None) -> None:
        if self.overflowed:
            raise CutOffError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the caller reads too slowly: over {self.max_bytes} bytes of output waited to be sent "
                "(--max-buffered-stream-bytes)",
                unsent,
            )

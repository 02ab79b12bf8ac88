"""What a streaming call has received from Triton and not yet written to its caller, bounded in time and bytes.

A caller that stops reading stalls the call's writes once gRPC's flow-control window is full. Its output then
waits here (the Triton stream is read eagerly, so Triton buffers nothing): a write that waits longer than the
write timeout ends the call CANCELLED, and output waiting behind the write past the byte cap ends it at once,
RESOURCE_EXHAUSTED. Either way the call's Triton request is stopped and its slot given back once it has stopped.
"""

from __future__ import annotations

import asyncio

import grpc
from google.protobuf.message import Message

from serving.frontend.status import plain


class Outbox:
    def __init__(self, max_bytes: int, write_timeout_s: float) -> None:
        self.max_bytes = max_bytes
        self.write_timeout_s = write_timeout_s
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
        try:
            self._check()
            # In this task, not a wait_for task: when the caller cancels, this task is cancelled (CANCELLED), where
            # a separate write task failed with grpcio's ExecuteBatchError and the call was logged as INTERNAL.
            async with asyncio.timeout(self.write_timeout_s) as self._write:
                await context.write(message)
        except TimeoutError:
            self._check()
            raise plain(grpc.StatusCode.CANCELLED, f"the caller read nothing for {self.write_timeout_s:g} s") from None
        finally:
            self._write = None

    def _check(self) -> None:
        if self.overflowed:
            raise plain(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the caller reads too slowly: over {self.max_bytes} bytes of output waited to be sent "
                "(--max-buffered-stream-bytes)",
            )

"""One call's Triton stream: its request, read eagerly by a task of its own, and, when the call ends early (the
caller left, the run time passed, a slow reader), a stop request on the same stream.

The stream is not cancelled to stop the work: that would end it at once, and the front end could not see when
the model had stopped, so the call's admission slot and reservation would come back while steps still ran. A stop
request (serving/triton/stops.py) makes the model end the request with its final response; the call ends when
that arrives, or when the grace period passes (then the stream is cancelled, Triton cancels the request, and
`on_grace_expired` counts it).

A model whose stub process died never answers the requests the stub was streaming (Triton's Python backend does not
end them), so the front end ends those calls itself once it sees the model reloaded (`model_down`): at once, the
stream cancelled, as there is nothing left to stop. (A request to a dead component from the BLS is failed by
Triton itself.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any, Protocol

import grpc
import numpy as np
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import InferInput, InferResult
from tritonclient.utils import InferenceServerException

from serving.frontend import cancel_clock
from serving.frontend.status import ApiError, plain
from serving.triton.wire import CALL_PARAMETER, STOP_PARAMETER

log = logging.getLogger(__name__)
FINAL_EVENTS = ("result", "done")
# Triton's own timeout on the stream, past the call's run time and grace: the front end ends calls itself, so
# that the stream is still open to carry the model's confirmation.
STREAM_MARGIN_S = 5.0
DRAIN_S = 2.0  # how long a finished stream is read, in the background, for Triton to end it before it is dropped

Response = tuple[dict[str, Any], InferResult, int]  # event, response, bytes held for the caller


class Buffer(Protocol):
    """Counts responses received and not yet handed on (serving/frontend/outbox.py)."""

    def hold(self, nbytes: int) -> None: ...

    def release(self, nbytes: int) -> None: ...


class Unbuffered:
    def hold(self, nbytes: int) -> None:
        pass

    def release(self, nbytes: int) -> None:
        pass


class TritonCall:
    def __init__(
        self,
        client: triton_aio.InferenceServerClient,
        model: str,
        inputs: list[InferInput],
        request_id: str,
        stream_error: Callable[[str], ApiError],
        transport_error: Callable[[grpc.RpcError | InferenceServerException], ApiError],
        drains: StreamDrains,
    ) -> None:
        self.client = client
        self.model = model
        self.inputs = inputs
        self.request_id = request_id
        self.key = uuid.uuid4().hex  # names the request to a stop request; unguessable by other callers
        self.stream_error = stream_error
        self.transport_error = transport_error
        self.drains = drains
        self._requests: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._responses: asyncio.Queue[Response | ApiError] = asyncio.Queue()
        self._stopping = False
        self._cancelled = False  # the stream was cancelled: nothing left to wait for
        self.started = 0.0  # the event loop's time when the stream was opened
        self._died = False  # its model's stub process died: nothing runs this request any more

    def model_down(self) -> None:
        """Ends the call UNAVAILABLE: its model was seen not ready, reloaded after its stub died
        (serving/triton/watchdog.py)."""
        if not self._died:
            self._died = True
            message = f"the {self.model} model's process died and was restarted; retry the call"
            self._responses.put_nowait(plain(grpc.StatusCode.UNAVAILABLE, message))

    async def responses(
        self, run_s: float, grace_s: float, buffer: Buffer, on_grace_expired: Callable[[], None]
    ) -> AsyncGenerator[tuple[dict[str, Any], InferResult], None]:
        """(event, response) pairs up to the final event. Past `run_s`: DEADLINE_EXCEEDED. However the caller
        leaves (an exception, a cancelled task, closing this generator), the model is asked to stop and this ends
        only once it has, or `grace_s` later."""
        self._requests.put_nowait(
            {
                "model_name": self.model,
                "inputs": self.inputs,
                "request_id": self.request_id,
                "parameters": {CALL_PARAMETER: self.key},
            }
        )
        self.started = asyncio.get_running_loop().time()
        stream = self.client.stream_infer(self._outgoing(), stream_timeout=run_s + grace_s + STREAM_MARGIN_S)
        reader = asyncio.create_task(self._read(stream, buffer))
        deadline = asyncio.get_running_loop().time() + run_s
        try:
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        item = await self._responses.get()
                except TimeoutError:
                    raise plain(grpc.StatusCode.DEADLINE_EXCEEDED, f"ran for {run_s:g} s") from None
                if isinstance(item, ApiError):
                    raise item
                payload, result, held = item
                buffer.release(held)
                yield payload, result
                if payload["type"] in FINAL_EVENTS:
                    return
        finally:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                cancel_clock.note()  # the cancellation waits for the stop below: the call is recorded by its time
            try:
                if self._died:
                    await self._cancel(stream, reader)
                elif not reader.done():
                    await self._stop(stream, reader, grace_s, on_grace_expired)
            finally:
                self._requests.put_nowait(None)  # closes the request side: Triton ends the stream
                if not self._cancelled:
                    self.drains.add(stream)

    async def _outgoing(self) -> AsyncIterator[dict[str, Any]]:
        while (request := await self._requests.get()) is not None:
            yield request

    async def _read(self, stream: Any, buffer: Buffer) -> None:
        """Every response, as it comes, up to the final one; errors go to the queue as ApiError."""
        try:
            async for result, error in stream:
                if error is not None:
                    self._responses.put_nowait(self.stream_error(error.message()))
                    return
                payload = json.loads(result.as_numpy("event")[0])
                final = payload["type"] in FINAL_EVENTS
                if not self._stopping:  # once stopping, only the end matters
                    held = 0 if final else _payload_bytes(result)  # a result is bounded by the response budget
                    buffer.hold(held)
                    self._responses.put_nowait((payload, result, held))
                if final:
                    return
            self._responses.put_nowait(
                plain(grpc.StatusCode.UNAVAILABLE, "the inference server closed the stream before the result")
            )
        except (grpc.RpcError, InferenceServerException) as exc:
            self._responses.put_nowait(self.transport_error(exc))
        except Exception:
            log.exception("reading the %s stream failed (request_id=%s)", self.model, self.request_id)
            self._responses.put_nowait(plain(grpc.StatusCode.INTERNAL, "internal error; the server log has details"))

    async def _stop(
        self, stream: Any, reader: asyncio.Task[None], grace_s: float, on_grace_expired: Callable[[], None]
    ) -> None:
        self._stopping = True
        stop = {
            "model_name": self.model,
            "inputs": [_empty_request()],
            "request_id": self.request_id,
            "parameters": {STOP_PARAMETER: self.key},
        }
        self._requests.put_nowait(stop)
        deadline = asyncio.get_running_loop().time() + grace_s
        cancelled = False
        while not reader.done():
            try:
                async with asyncio.timeout_at(deadline):
                    await asyncio.shield(reader)  # the final response: the model has stopped
            except TimeoutError:
                on_grace_expired()
                await self._cancel(stream, reader)  # Triton cancels the request; the model stops at its next check
            except asyncio.CancelledError:
                # The call's task cancelled while it waits (the caller's deadline right after the run time, a
                # shutdown): the slot is still held until the model has stopped; the cancellation goes on after.
                cancelled = True
                cancel_clock.note()
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()
        if cancelled:
            raise asyncio.CancelledError

    async def _cancel(self, stream: Any, reader: asyncio.Task[None]) -> None:
        stream.cancel()
        self._cancelled = True
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader


class StreamDrains:
    """Finished streams read to their end in the background, for at most `limit_s` each, after the request side
    closed. A stream dropped before its end is cancelled by gRPC, and Triton 2.51 then sometimes waits forever for
    a response callback of a request that has already ended: that model never unloads, and a stopping Triton hangs
    until its exit timeout (docs/reliability.md). In the background, so that neither the caller's answer nor the
    call's admission slot waits for Triton's end of the stream."""

    def __init__(self, limit_s: float = DRAIN_S) -> None:
        self.limit_s = limit_s
        self._tasks: set[asyncio.Task[None]] = set()

    def add(self, stream: Any) -> None:
        task = asyncio.get_running_loop().create_task(self._drain(stream))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Waits for the streams still being read (each bounded by `limit_s`): before the client closes."""
        await asyncio.gather(*self._tasks)

    async def _drain(self, stream: Any) -> None:
        with contextlib.suppress(TimeoutError, grpc.RpcError, InferenceServerException):
            async with asyncio.timeout(self.limit_s):
                async for _ in stream:  # nothing follows a final response; an error is already reported
                    pass


def _payload_bytes(result: InferResult) -> int:
    return sum(len(content) for content in result.get_response().raw_output_contents)


def _empty_request() -> InferInput:
    tensor = InferInput("request", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([b"{}"], dtype=np.object_))
    return tensor

"""A budget of request bytes the gRPC server holds, taken before a request is read, and a time to receive it.

grpcio reads a unary call's request before its handler runs; until a request is asked for, gRPC core holds only
what HTTP/2 flow control lets in (about 4 MiB a stream, measured), not the message. So every unary-request
handler is served here as a streamed request that it reads itself, after reserving the most the transport will
read (2 x --max-request-bytes) against the call's budget. Without room, the call waits up to --retry-after-s (a
burst of small calls reserves far more than it reads: the room comes back as soon as their few bytes are in),
then gets RESOURCE_EXHAUSTED with RetryInfo, unread (the caller stops sending; nothing of the message is kept).
A call that ends here, before its handler runs (refused, its request late or missing, cancelled by its caller or its
deadline while it waits or sends), is recorded here (`on_ended`: one access-log line and count, as its handler's
would be, with its peer, request id and the time it took); one that is read, by its handler.
At most MAX_WAITING calls wait per budget, each holding at most its flow-control window; the others are refused
at once.

Once read, the reservation shrinks to the message's size and is given back when the handler ends, however it ends
(the handler holds the request that long), or, for a call cancelled while its request is parsed on the reader thread
or waits for it, once that thread has let the bytes go: a parse cannot be stopped, and giving the bytes back at once
let new calls take the room the thread still held. The message must arrive within --request-read-timeout-s: a call
that opens and sends nothing would otherwise hold its reservation for ever. The uploads (Generate, GenerateStream,
Understand) and every other gated call (GetModelInfo) have separate budgets, so that a flood of one does not refuse
the other; the others' is at most OTHER_READS requests of the largest size and their requests must arrive within
OTHER_READ_TIMEOUT_S: theirs are a few bytes sent at once, and a caller sending large or slow ones to them gains
nothing but memory. Health (grpc.health.v1.Health) is not gated at all: silent calls holding a budget would refuse
the kubelet's probes; its requests are read as grpcio reads any, each bounded by the transport's cap.

A gated request's bytes are parsed here, not by grpcio: one of INLINE_PARSE_BYTES or more in a worker thread, so
that the event loop (health, every other call) does not wait on parsing uploads (8 x 100 MiB at once kept a health
probe waiting 2-3 s). Smaller ones are parsed inline: a thread hop would cost more than it saves.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import Executor
from typing import Any

import grpc

from serving.frontend import cancel_clock, request_id
from serving.frontend.metrics import Metrics
from serving.frontend.status import resource_exhausted

# A waiter holds at most its stream's flow-control window (about 4 MiB; a small call only its few bytes), not its
# reservation: 256 of them are 1 GiB at worst per budget, half the default uploads budget, and let a burst of
# small calls (GetModelInfo behind HTTP GET /v1/models, many times --max-in-flight) wait instead of being refused.
WINDOW_BYTES = 4 * 1024 * 1024
MAX_WAITING = 1024 * 1024 * 1024 // WINDOW_BYTES
OTHER_READS = 4
OTHER_READ_TIMEOUT_S = 5.0
UNGATED = "/grpc.health.v1.Health/"
# Parsed on the event loop below this (well under a millisecond); larger requests in a worker thread. protobuf holds
# the GIL while it parses, so the loop still waits for one parse at a time (about 70 ms for 100 MiB), not for all.
INLINE_PARSE_BYTES = 1024 * 1024


class _Pool:
    def __init__(self, name: str, budget: int, read_timeout_s: float, metrics: Metrics) -> None:
        self.name = name
        self.budget = budget
        self.read_timeout_s = read_timeout_s
        self.gauge = metrics.held_request_bytes.labels(name)
        self.held = 0
        self.waiting = 0
        self._room = asyncio.Event()  # set, and replaced, each time bytes are given back

    def add(self, size: int) -> None:
        self.held += size
        self.gauge.set(self.held)
        if size < 0:
            self._room.set()
            self._room = asyncio.Event()

    async def wait_for_room(self, size: int, wait_s: float) -> bool:
        if self.held + size <= self.budget:
            return True
        if self.waiting >= MAX_WAITING:
            return False
        self.waiting += 1
        try:
            async with asyncio.timeout(wait_s):
                while self.held + size > self.budget:
                    await self._room.wait()
            return True
        except TimeoutError:
            return False
        finally:
            self.waiting -= 1


class _Reservation:
    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self.size = 0
        self.parsing: asyncio.Future[Any] | None = None  # the request's parse on the executor

    def resize(self, size: int) -> None:
        self.pool.add(size - self.size)
        self.size = size

    def release(self) -> None:
        """Gives the bytes back, once the executor no longer holds them: a parse cannot be stopped, and a request
        queued behind one is held until the thread reaches it (then skipped)."""
        if self.parsing is None or self.parsing.done():
            self.resize(0)
        else:
            self.parsing.add_done_callback(lambda _: self.resize(0))


class ReadGate(grpc.aio.ServerInterceptor):
    """Unary requests are read only while `budget` bytes cover them (uploads and other methods apart; health is
    not gated)."""

    def __init__(
        self,
        uploads: frozenset[str],
        budget: int,
        max_message_bytes: int,
        read_timeout_s: float,
        retry_after_s: float,
        metrics: Metrics,
        on_ended: Callable[[str, grpc.StatusCode, str, float, str], None],
        executor: Executor | None = None,
        cut_at: Callable[[], float | None] = lambda: None,
        running: set[asyncio.Task[Any]] | None = None,
    ) -> None:
        """Large requests are parsed on `executor` (None: the event loop's default one). `on_ended(method, status,
        peer, seconds, request_id)` records a call that ends here; `cut_at`: when the server's stop cut its calls
        (time.monotonic(); None: not stopping); `running`: the set of call tasks the server's stop waits for, which
        holds each gated call's task from its read on (a call cut while its request arrives is waited for too).
        FrontendConfig checks the settings these come from (`budget` >= `max_message_bytes`, a timeout above 0)."""
        self.uploads = uploads
        self.pools = {
            "uploads": _Pool("uploads", budget, read_timeout_s, metrics),
            "other": _Pool(
                "other",
                min(budget, OTHER_READS * max_message_bytes),
                min(read_timeout_s, OTHER_READ_TIMEOUT_S),
                metrics,
            ),
        }
        self.max_message_bytes = max_message_bytes
        self.read_timeout_s = read_timeout_s
        self.retry_after_s = retry_after_s
        self.metrics = metrics
        self.on_ended = on_ended
        self.executor = executor
        self.cut_at = cut_at
        self.running: set[asyncio.Task[Any]] = set() if running is None else running

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or handler.request_streaming or method.startswith(UNGATED):
            # Streamed requests are read as their handler asks (an unread refusal among them); health's as grpcio
            # reads any, so that no silent caller can hold a budget its probes need.
            return handler
        return self._gated(handler, method, self.pools["uploads" if method in self.uploads else "other"])

    def _gated(self, handler: grpc.RpcMethodHandler, method: str, pool: _Pool) -> grpc.RpcMethodHandler:
        """`handler` served as a streamed request that it reads through a _GatedCall, in its form: a unary reply, an
        async generator of replies, or a writer of its own."""
        call = _GatedCall(self, method, pool, handler.request_deserializer or (lambda data: data))
        options = {"request_deserializer": call.received, "response_serializer": handler.response_serializer}
        if not handler.response_streaming:

            async def unary(requests: Any, context: grpc.aio.ServicerContext) -> None:
                with self._running():
                    try:
                        response = await handler.unary_unary(await call.read(context), context)
                    finally:
                        call.reservation.release()
                    if response is not None:  # None: the handler wrote its reply itself
                        await context.write(response)

            # Served as a streamed response, one message then the status (the same on the wire), so that a handler
            # can write its reply itself: grpcio sends a returned one after the handler has ended, and that write
            # waits on the caller outside the handler's time and budgets.
            return grpc.stream_stream_rpc_method_handler(unary, **options)
        if inspect.isasyncgenfunction(handler.unary_stream):

            async def generator(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                with self._running():
                    try:
                        async for response in handler.unary_stream(await call.read(context), context):
                            yield response
                    finally:
                        call.reservation.release()

            return grpc.stream_stream_rpc_method_handler(generator, **options)

        async def writer(requests: Any, context: grpc.aio.ServicerContext) -> None:
            with self._running():
                try:
                    await handler.unary_stream(await call.read(context), context)
                finally:
                    call.reservation.release()

        return grpc.stream_stream_rpc_method_handler(writer, **options)

    @contextlib.contextmanager
    def _running(self) -> Iterator[None]:
        """The call's task is in `running` while the gate reads its request and its handler runs."""
        task = asyncio.current_task()
        assert task is not None  # grpc.aio runs each handler in a task
        self.running.add(task)
        try:
            yield
        finally:
            self.running.discard(task)


class _GatedCall:
    """One gated call's request: room reserved for it in its pool, read within the pool's time, then parsed."""

    def __init__(self, gate: ReadGate, method: str, pool: _Pool, parse: Callable[[bytes], Any]) -> None:
        self.gate = gate
        self.method = method
        self.pool = pool
        self.parse = parse
        self.reservation = _Reservation(pool)

    def received(self, data: bytes) -> bytes:
        """grpcio's deserializer: the bytes as they are, parsed by read()."""
        self.reservation.resize(len(data))
        return data

    async def read(self, context: grpc.aio.ServicerContext) -> Any:
        """The parsed request; a call that ends here is recorded here (ReadGate's `on_ended`), once."""
        # Read now: once a caller has cancelled, grpcio may have freed the call (service.py, _counted).
        began, peer, budget = time.monotonic(), context.peer(), context.time_remaining()
        metadata = context.invocation_metadata()
        recorded = False

        def ended(code: grpc.StatusCode) -> None:
            nonlocal recorded
            if not recorded:  # once: a refused call may be cancelled while its status goes out
                seconds = time.monotonic() - began
                self.gate.on_ended(self.method, code, peer, seconds, request_id.from_metadata(metadata))
            recorded = True

        try:
            return await self._receive(context, ended)
        except (asyncio.CancelledError, grpc.aio.InternalError):
            # Gone while it waited or sent (the task cancelled, or its status could not be sent): its caller
            # cancelled, or its deadline or the server's stop came.
            ended(cancel_clock.status(time.monotonic(), began, budget, self.gate.cut_at()))
            raise

    async def _receive(self, context: grpc.aio.ServicerContext, ended: Callable[[grpc.StatusCode], None]) -> Any:
        gate, pool = self.gate, self.pool
        if not await pool.wait_for_room(gate.max_message_bytes, gate.retry_after_s):
            self._refused("budget", ended, grpc.StatusCode.RESOURCE_EXHAUSTED)
            error = resource_exhausted(
                f"{pool.held} bytes of requests held and this one may take {gate.max_message_bytes}, the "
                f"budget is {pool.budget} (--max-held-request-bytes); retry later",
                gate.retry_after_s,
            )
            await context.abort_with_status(error.status)
        self.reservation.resize(gate.max_message_bytes)
        try:
            async with asyncio.timeout(pool.read_timeout_s):  # not wait_for: its task is one more loop turn
                request = await context.read()
        except TimeoutError:
            self._refused("timeout", ended, grpc.StatusCode.DEADLINE_EXCEEDED)
            flag = pool.read_timeout_s == gate.read_timeout_s
            limit = "--request-read-timeout-s" if flag else "the limit for calls other than uploads"
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"the request did not arrive within {pool.read_timeout_s:g} s ({limit})",
            )
        if request is grpc.aio.EOF:
            try:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the call ended without its request")
            except grpc.aio.AbortError:
                # Sent, so counted. Otherwise (InternalError) grpcio had already ended the call: its caller left
                # (recorded by read as gone), or it sent a message over the transport's cap, which grpcio
                # refused RESOURCE_EXHAUSTED and which reads the same here (recorded as gone too). grpcio 1.81
                # shows the two alike: read() returns EOF, code(), details(), done() and cancelled() are the
                # same, the abort fails the same way and the task is cancelled in both; the status gRPC core
                # sent is not exposed, nor is the message's declared length (the gate sees whole messages).
                ended(grpc.StatusCode.INVALID_ARGUMENT)
                raise
        return await self._parsed(request)

    async def _parsed(self, request: bytes) -> Any:
        """Parsed inline below INLINE_PARSE_BYTES, on the gate's executor from there."""
        if len(request) < INLINE_PARSE_BYTES:
            return self.parse(request)
        wanted = True

        def parse_if_wanted() -> Any:
            return self.parse(request) if wanted else None

        self.reservation.parsing = asyncio.get_running_loop().run_in_executor(self.gate.executor, parse_if_wanted)
        try:
            return await asyncio.shield(self.reservation.parsing)  # a cancelled call's bytes stay counted (release)
        except asyncio.CancelledError:
            wanted = False
            raise

    def _refused(self, reason: str, ended: Callable[[grpc.StatusCode], None], code: grpc.StatusCode) -> None:
        self.gate.metrics.reads_refused.labels(self.pool.name, reason).inc()
        ended(code)


def unread_refusal(
    handler: grpc.RpcMethodHandler, status: grpc.Status, recorded: Callable[[str, float, str], None]
) -> grpc.RpcMethodHandler:
    """A handler for a unary-request method that ends the call with `status` without reading its request: grpcio
    reads a streamed request only when asked. `recorded(peer, seconds, request_id)` is called once the status is
    sent (or the caller has gone), seconds counted from now."""
    began = time.monotonic()

    async def refuse(requests: Any, context: grpc.aio.ServicerContext) -> None:
        peer, metadata = context.peer(), context.invocation_metadata()  # read first, as read() does
        try:
            await context.abort_with_status(status)
        finally:
            recorded(peer, time.monotonic() - began, request_id.from_metadata(metadata))

    options = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse, **options)
    return grpc.stream_unary_rpc_method_handler(refuse, **options)

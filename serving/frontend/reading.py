"""A budget of request bytes the gRPC server holds, taken before a request is read, and a time to receive it.

grpcio reads a unary call's request before its handler runs, once the interceptors have returned the handler;
until then gRPC core holds what HTTP/2 flow control lets in (about 4 MiB a stream, measured), not the message.
So a call reserves here first the most the transport will read (2 x --max-request-bytes). One whose reservation
does not fit is refused unread: RESOURCE_EXHAUSTED with RetryInfo, from a handler that takes the request as a
stream it never reads (the caller stops sending; nothing of the message is kept). Refusing rather than queueing:
a waiting call would hold its flow-control window for as long as it waited, and callers already retry
admission's RESOURCE_EXHAUSTED.

An admitted call's handler is served the same way, as a streamed request that it reads itself: within
--request-read-timeout-s (a call that opens and sends nothing would otherwise hold its reservation for ever), and
with the reservation shrunk to the message's size once read and given back when the handler ends, however it
ends (the handler holds the request that long). The uploads (Generate, GenerateStream,
Understand) and every other call (health, GetModelInfo) have separate budgets of the same size, so that probes
keep answering while uploads fill theirs.
"""

from __future__ import annotations

import asyncio
import inspect
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from serving.errors import SettingError
from serving.frontend.metrics import Metrics
from serving.frontend.status import resource_exhausted


class _Pool:
    def __init__(self, name: str, budget: int, metrics: Metrics) -> None:
        self.name = name
        self.budget = budget
        self.gauge = metrics.held_request_bytes.labels(name)
        self.held = 0

    def add(self, size: int) -> None:
        self.held += size
        self.gauge.set(self.held)


class _Reservation:
    """Given back once: by close(), or, should grpcio drop a call before its handler ran, with the handler."""

    def __init__(self, pool: _Pool, size: int) -> None:
        self.pool = pool
        self._size = [size]  # shared with the finalizer, which must not refer to self
        pool.add(size)
        self.close = weakref.finalize(self, _give_back, pool, self._size)

    def resize(self, size: int) -> None:
        if self.close.alive:
            self.pool.add(size - self._size[0])
            self._size[0] = size


def _give_back(pool: _Pool, size: list[int]) -> None:
    pool.add(-size[0])


class ReadGate(grpc.aio.ServerInterceptor):
    """Unary requests are read only while `budget` bytes cover them (uploads and other methods apart)."""

    def __init__(
        self,
        uploads: frozenset[str],
        budget: int,
        max_message_bytes: int,
        read_timeout_s: float,
        retry_after_s: float,
        metrics: Metrics,
        on_refused: Callable[[str, grpc.StatusCode], None],
    ) -> None:
        if budget < max_message_bytes:
            raise SettingError(
                "--max-held-request-bytes", f"must be at least 2 x --max-request-bytes ({max_message_bytes})"
            )
        if read_timeout_s <= 0:
            raise SettingError("--request-read-timeout-s", "must be > 0")
        self.uploads = uploads
        self.pools = {name: _Pool(name, budget, metrics) for name in ("uploads", "other")}
        self.max_message_bytes = max_message_bytes
        self.read_timeout_s = read_timeout_s
        self.retry_after_s = retry_after_s
        self.metrics = metrics
        self.on_refused = on_refused

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming:
            return handler  # streamed requests are read as their handler asks; a refusal here reads nothing
        method: str = handler_call_details.method
        pool = self.pools["uploads" if method in self.uploads else "other"]
        if pool.held + self.max_message_bytes > pool.budget:
            self.metrics.reads_refused.labels(pool.name, "budget").inc()
            self.on_refused(method, grpc.StatusCode.RESOURCE_EXHAUSTED)
            error = resource_exhausted(
                f"{pool.held} bytes of requests held and this one may take {self.max_message_bytes}, the budget is "
                f"{pool.budget} (--max-held-request-bytes); retry later",
                self.retry_after_s,
            )
            return unread_refusal(handler, error.status)
        return self._gated(handler, method, _Reservation(pool, self.max_message_bytes))

    def _gated(self, handler: grpc.RpcMethodHandler, method: str, reservation: _Reservation) -> grpc.RpcMethodHandler:
        parse = handler.request_deserializer or (lambda data: data)

        def deserialize(data: bytes) -> Any:
            reservation.resize(len(data))
            return parse(data)

        async def read(context: grpc.aio.ServicerContext) -> Any:
            try:
                request = await asyncio.wait_for(context.read(), self.read_timeout_s)
            except TimeoutError:
                self.metrics.reads_refused.labels(reservation.pool.name, "timeout").inc()
                self.on_refused(method, grpc.StatusCode.DEADLINE_EXCEEDED)
                await context.abort(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"the request did not arrive within {self.read_timeout_s:g} s (--request-read-timeout-s)",
                )
            if request is grpc.aio.EOF:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the call ended without its request")
            return request

        options = {"request_deserializer": deserialize, "response_serializer": handler.response_serializer}
        if not handler.response_streaming:

            async def unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    return await handler.unary_unary(await read(context), context)
                finally:
                    reservation.close()

            return grpc.stream_unary_rpc_method_handler(unary, **options)
        if inspect.isasyncgenfunction(handler.unary_stream):

            async def generator(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                try:
                    async for response in handler.unary_stream(await read(context), context):
                        yield response
                finally:
                    reservation.close()

            return grpc.stream_stream_rpc_method_handler(generator, **options)

        async def writer(requests: Any, context: grpc.aio.ServicerContext) -> None:
            try:
                await handler.unary_stream(await read(context), context)
            finally:
                reservation.close()

        return grpc.stream_stream_rpc_method_handler(writer, **options)


def unread_refusal(handler: grpc.RpcMethodHandler, status: grpc.Status) -> grpc.RpcMethodHandler:
    """A handler for a unary-request method that ends the call with `status` without reading its request: grpcio
    reads a streamed request only when asked."""

    async def refuse(requests: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort_with_status(status)

    options = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse, **options)
    return grpc.stream_unary_rpc_method_handler(refuse, **options)

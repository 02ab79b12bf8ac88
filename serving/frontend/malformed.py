"""Request bytes that do not parse reach the handler as `Malformed`, so the call ends INVALID_ARGUMENT through the
same path as every other call (counted, one access-log line); grpcio's own answer is UNKNOWN with a traceback."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError


@dataclass(frozen=True)
class Malformed:
    reason: str


def _tolerant(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as exc:
            return Malformed(str(exc) or "not a valid message")

    return deserialize


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """Gives the handlers of methods under `prefix` a deserializer that never raises."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if (
            handler is None
            or handler.request_deserializer is None
            or not handler_call_details.method.startswith(self.prefix)
        ):
            return handler
        return handler._replace(request_deserializer=_tolerant(handler.request_deserializer))

"""Errors of the OpenAI-compatible HTTP API: the OpenAI error body, and the gRPC statuses mapped onto it.

Every limit is enforced once, by the gRPC service; its statuses arrive here and keep their meaning: the field a
google.rpc.BadRequest names becomes `param` (under the name the HTTP caller used), RetryInfo becomes Retry-After
(an UNAVAILABLE without one, retryable by its nature, gets the server's --retry-after-s).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from omnigen2.errors import InvalidArgumentError, ResourceExhaustedError
from omnigen2.errors import from_rpc_error as decode_rpc_error


@dataclass
class OpenAIError(Exception):
    """Ends an HTTP request with `status` and the OpenAI error body."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(param: str | None, message: str, code: str = "invalid_value") -> OpenAIError:
    """A 400 naming `param`, cut as `cut` does: a caller's unknown key of 100 KB is not sent back whole."""
    param = cut(param, 64) if param else param
    return OpenAIError(400, f"{param}: {message}" if param else message, param=param, code=code)


def cut(text: str, limit: int = 40) -> str:
    """`text` for a message, at most `limit` characters: what a caller sent is shown, not echoed in full."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def shown(value: Any) -> str:
    """A caller's value in a message: its repr, cut."""
    return cut(repr(value))


# What grpcio's client says when an answer is over its own limits (core's wording).
_LOCAL_LIMITS = re.compile(r"metadata size exceeds limit|Received message larger than max", re.IGNORECASE)
# gRPC status -> (HTTP status, OpenAI error type, code)
_BY_CODE: dict[grpc.StatusCode, tuple[int, str, str | None]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", "invalid_value"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error", "invalid_value"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error", None),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error", "invalid_api_key"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error", None),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error", None),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "rate_limit_exceeded"),
    grpc.StatusCode.CANCELLED: (499, "server_error", "cancelled"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "server_error", None),
    grpc.StatusCode.UNAVAILABLE: (503, "server_error", "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "server_error", "timeout"),
}


def from_rpc(error: grpc.RpcError, param: Callable[[str], str], unavailable_retry_s: float = 1.0) -> OpenAIError:
    """The HTTP answer to a failed call; `param` renames a request field to the HTTP caller's name for it."""
    typed = decode_rpc_error(error)  # the SDK's decoding of the google.rpc details
    status, kind, code = _BY_CODE.get(typed.code, (500, "server_error", None))
    if isinstance(typed, InvalidArgumentError) and typed.violations:
        named = [(param(v.field), v.field, v.description) for v in typed.violations]
        names = [name for name, _, _ in named]
        # Fields the caller sent as one (width and height as `size`) say which of them each violation is about.
        message = "; ".join(
            f"{name} ({grpc_field}): {description}"
            if names.count(name) > 1 and name != grpc_field
            else f"{name}: {description}"
            for name, grpc_field, description in named
        )
        return OpenAIError(status, message, kind, names[0], code)
    retry_after = typed.retry_after if isinstance(typed, ResourceExhaustedError) else _retry_delay(error)
    if retry_after is None and typed.code == grpc.StatusCode.UNAVAILABLE:
        retry_after = unavailable_retry_s
    if retry_after is not None:
        headers = {"Retry-After": str(max(1, math.ceil(retry_after)))}
        return OpenAIError(status, typed.message, kind, None, code, headers)
    if typed.code == grpc.StatusCode.RESOURCE_EXHAUSTED and _LOCAL_LIMITS.search(typed.message):
        # The gateway's own gRPC client could not take the answer (metadata or a message over its limits): a 429
        # would have OpenAI's clients retry what fails the same way each time.
        return OpenAIError(500, f"the gateway could not take the service's answer: {typed.message}", "server_error")
    info = _error_info(error) if typed.code == grpc.StatusCode.PERMISSION_DENIED else None
    if info is not None:
        # The content policy (an ErrorInfo naming the rule and the field); a token's scope has no details: 403.
        field = info.metadata.get("field")
        return OpenAIError(
            400, typed.message, "invalid_request_error", param(field) if field else None, "content_policy_violation"
        )
    return OpenAIError(status, typed.message, kind, None, code)


def _error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    status = rpc_status.from_call(error)
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info
    return None


def _retry_delay(error: grpc.RpcError) -> float | None:
    """The RetryInfo delay of a status other than RESOURCE_EXHAUSTED (the SDK decodes only that one's)."""
    status = rpc_status.from_call(error)
    for detail in status.details if status is not None else ():
        retry = error_details_pb2.RetryInfo()
        if detail.Unpack(retry):
            return float(retry.retry_delay.ToNanoseconds() / 1e9)
    return None

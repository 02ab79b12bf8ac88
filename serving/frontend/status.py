"""gRPC statuses with google.rpc details (BadRequest, RetryInfo), raised inside handlers as ApiError."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from google.protobuf import duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

# grpc.StatusCode -> google.rpc.Code number (the rich status carries the latter).
_CODE_NUMBERS = {code: code.value[0] for code in grpc.StatusCode}


class ApiError(Exception):
    """Ends the call with `status`; the servicer turns it into an abort."""

    def __init__(self, status: grpc.Status) -> None:
        super().__init__(status.details)
        self.status = status

    @property
    def code(self) -> grpc.StatusCode:
        return self.status.code


def make_status(code: grpc.StatusCode, message: str, *details: Message) -> grpc.Status:
    status = status_pb2.Status(code=_CODE_NUMBERS[code], message=message)
    for detail in details:
        status.details.add().Pack(detail)
    return rpc_status.to_status(status)


# An error's violations go out as trailers (the BadRequest detail and the message, both): a request with a
# thousand bad parts made 86 KB of them, over a default client's 8 KiB metadata limit, which then failed with
# RESOURCE_EXHAUSTED instead of this error. The first MAX_VIOLATIONS are listed, then a count of the rest.
MAX_VIOLATIONS = 10
MAX_DESCRIPTION_CHARS = 200  # a default client takes 8 KiB of metadata: this bounds the trailers near 5 KiB


def invalid_argument(violations: Sequence[tuple[str, str]]) -> ApiError:
    """INVALID_ARGUMENT naming the offending fields (google.rpc.BadRequest field violations): the first
    MAX_VIOLATIONS, then one violation of the field `request` counting the others."""
    listed = [(field, _shortened(description)) for field, description in violations[:MAX_VIOLATIONS]]
    if len(violations) > MAX_VIOLATIONS:
        listed.append(("request", f"{len(violations) - MAX_VIOLATIONS} more violations, not listed"))
    request = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
            for field, description in listed
        ]
    )
    message = "; ".join(f"{field}: {description}" for field, description in listed)
    return ApiError(make_status(grpc.StatusCode.INVALID_ARGUMENT, message, request))


def _shortened(description: str) -> str:
    if len(description) <= MAX_DESCRIPTION_CHARS:
        return description
    return description[: MAX_DESCRIPTION_CHARS - 3] + "..."


def resource_exhausted(message: str, retry_after_s: float) -> ApiError:
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(int(retry_after_s * 1e9))
    return ApiError(
        make_status(grpc.StatusCode.RESOURCE_EXHAUSTED, message, error_details_pb2.RetryInfo(retry_delay=delay))
    )


def plain(code: grpc.StatusCode, message: str) -> ApiError:
    return ApiError(make_status(code, message))

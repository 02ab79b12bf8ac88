"""Typed exceptions for every status the OmniGen2 API returns."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


@dataclass(frozen=True)
class FieldViolation:
    field: str  # the request field, e.g. "steps" or "input_images[1].data"
    description: str


class OmniGen2Error(Exception):
    """A call failed; `code` is the gRPC status and `message` the server's explanation."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class InvalidArgumentError(OmniGen2Error):
    """The request broke a documented limit; `violations` names each offending field."""

    def __init__(self, code: grpc.StatusCode, message: str, violations: list[FieldViolation]) -> None:
        super().__init__(code, message)
        self.violations = violations


class ResourceExhaustedError(OmniGen2Error):
    """The server is at capacity; retry after `retry_after` seconds (None when the server gave no hint)."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after: float | None) -> None:
        super().__init__(code, message)
        self.retry_after = retry_after


class PermissionDeniedError(OmniGen2Error):
    """The caller may not make this call: outside its token's scope, or refused by the server's content policy, in
    which case `reason` is the policy rule's id and `field` the request field (or "answer") it matched in."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str, field: str) -> None:
        super().__init__(code, message)
        self.reason = reason
        self.field = field


class UnavailableError(OmniGen2Error):
    """The server or its inference backend is down; the client already retried with backoff. `unreachable` is the
    address tried when no server answered there at all (none running, a wrong address), else "" (also when one
    answered but its TLS did not match the call's: the message says so)."""

    def __init__(self, code: grpc.StatusCode, message: str, unreachable: str = "") -> None:
        super().__init__(code, message)
        self.unreachable = unreachable


# How gRPC's own client words a call that reached no server (connect refused or timed out, a name not resolved);
# a server's UNAVAILABLE (its Triton down, draining) carries the server's words instead.
_NO_SERVER = ("failed to connect to all addresses", "errors resolving", "DNS resolution failed")


def _tls_mismatch(server: str, message: str) -> str:
    """What to do when gRPC's "failed to connect" was a server that answered with TLS where the call had none, or
    the reverse (gRPC words both as no server); "" when the message shows no such thing."""
    if "WRONG_VERSION_NUMBER" in message:  # the call's TLS hello met a plaintext server
        return (
            f"the server at {server} answered without TLS ({message}); call it without --tls/--tls-ca (the SDK's"
            " tls=False), or start it with --tls-cert and --tls-key"
        )
    if "CERTIFICATE_VERIFY_FAILED" in message:
        return (
            f"the server at {server} answered with TLS but its certificate is not trusted ({message}); give the"
            " certificate that signed it with --tls-ca (the SDK's tls=<PEM bytes>)"
        )
    if "handshake failed" in message.lower():
        return (
            f"the server at {server} answered but the TLS handshake failed ({message}); check --tls/--tls-ca (the"
            " SDK's tls) against the server's --tls-cert"
        )
    if "Socket closed" in message:  # a TLS server drops a plaintext call's connection unanswered
        return (
            f"the server at {server} took the connection and closed it ({message}), as a TLS server does to a call"
            " without TLS; add --tls, or --tls-ca for a private certificate (the SDK's tls=True or tls=<PEM bytes>)"
        )
    return ""


class DeadlineExceededError(OmniGen2Error):
    """The call's timeout passed; the server stopped the work."""


class CancelledError(OmniGen2Error):
    """The call was cancelled; the server stopped the work."""


class InternalError(OmniGen2Error):
    """The server failed; the message says how, and the server log has the details."""


_BY_CODE: dict[grpc.StatusCode, type[OmniGen2Error]] = {
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.CANCELLED: CancelledError,
    grpc.StatusCode.INTERNAL: InternalError,
}


def from_rpc_error(error: grpc.RpcError, server: str = "") -> OmniGen2Error:
    """The typed exception for a failed call (sync or asyncio), with the google.rpc details decoded. `server`, the
    address called, is named when no server answered there, with what to do about it."""
    code: grpc.StatusCode = error.code()
    message: str = error.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE and server and message.startswith(_NO_SERVER):
        if mismatch := _tls_mismatch(server, message):
            return UnavailableError(code, mismatch)  # the address is right: not `unreachable`
        hint = f"no OmniGen2 server answered at {server} ({message}); start one with `make serve`, or give the address"
        return UnavailableError(code, f"{hint} of a running one", server)
    status = rpc_status.from_call(error)
    details = list(status.details) if status is not None else []
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        violations = []
        for detail in details:
            bad_request = error_details_pb2.BadRequest()
            if detail.Unpack(bad_request):
                violations += [FieldViolation(v.field, v.description) for v in bad_request.field_violations]
        return InvalidArgumentError(code, message, violations)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        retry_after = None
        for detail in details:
            retry = error_details_pb2.RetryInfo()
            if detail.Unpack(retry):
                retry_after = retry.retry_delay.ToNanoseconds() / 1e9
        return ResourceExhaustedError(code, message, retry_after)
    if code == grpc.StatusCode.PERMISSION_DENIED:
        reason, field = "", ""
        for detail in details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                reason, field = info.reason, info.metadata.get("field", "")
        return PermissionDeniedError(code, message, reason, field)
    return _BY_CODE.get(code, OmniGen2Error)(code, message)

"""The id that follows one call: the caller's `x-request-id` (or a new one), sent back to the caller in the
initial metadata, written in the access log, and set as Triton's request id, which the Triton models log failures
with. It lives in a context variable for the call's task, so the Triton link reads it without every layer in
between passing it on."""

from __future__ import annotations

import contextvars
import re
import uuid
from collections.abc import Iterable

HEADER = "x-request-id"
# The replica that served the call, in the same initial metadata (FrontendConfig.server_id).
SERVED_BY = "x-served-by"
# Logs and Triton see this text: take the caller's only when it is a plain token of a sane length.
_PLAIN = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")
_current: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


def from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    for key, value in metadata or ():
        if key == HEADER and isinstance(value, str) and _PLAIN.fullmatch(value):
            return value
    return uuid.uuid4().hex


def begin(request_id: str) -> contextvars.Token[str]:
    return _current.set(request_id)


def end(token: contextvars.Token[str]) -> None:
    _current.reset(token)


def current() -> str:
    """The id of the call this task serves, "" outside a call."""
    return _current.get()

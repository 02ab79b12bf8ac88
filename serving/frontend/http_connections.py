"""The HTTP gateway's bound on open connections (--http-max-connections): each one it serves is counted, and one
past the bound is answered 503 and closed unread, without aiohttp (OpenAIGateway._connection)."""

from __future__ import annotations

import asyncio
import json
import logging
import resource
from typing import TYPE_CHECKING

from serving.frontend.openai_errors import OpenAIError

if TYPE_CHECKING:
    from serving.frontend.openai_http import OpenAIGateway

log = logging.getLogger("omnigen2.http")


class Counted(asyncio.Protocol):
    """aiohttp's protocol for a connection, counted among the gateway's open ones from connection_made to
    connection_lost (not at creation: a TLS handshake that fails calls neither)."""

    def __init__(self, inner: asyncio.Protocol, gateway: OpenAIGateway) -> None:
        self.inner = inner
        self.gateway = gateway
        self.made = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made = True
        self.gateway.connections += 1
        self.gateway.metrics.http_connections.inc()
        self.inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.made:
            self.made = False
            self.gateway.connections -= 1
            self.gateway.metrics.http_connections.dec()
        self.inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class Refused(asyncio.Protocol):
    """A connection past the bound: `answer` (a 503) and closed, its request unread."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(self.answer)
        transport.close()


def unavailable(message: str, retry_after_s: int) -> bytes:
    """A whole HTTP/1.1 503 response, OpenAI's error body, that closes its connection: written without aiohttp."""
    body = json.dumps(OpenAIError(503, message, "server_error", code="serviceunavailable").body()).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nRetry-After: {retry_after_s}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


def open_files() -> int:
    """The process's open-file limit, its soft limit first raised to the hard one, as servers do: the soft one is
    often 1024, few for thousands of HTTP connections beside the gRPC and Triton ones."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard and hard != resource.RLIM_INFINITY:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("open-file limit left at %d: cannot raise it to its hard limit %d (%s)", soft, hard, exc)
            return soft
        log.info("open-file limit raised from %d to its hard limit %d", soft, hard)
        return hard
    return soft

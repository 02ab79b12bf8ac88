"""HTTP requests whose request line or headers do not parse (aiohttp's parser refuses them before any route, token
check or access-log line): answered 400 in OpenAI's error shape and closed, counted in
omnigen2_http_malformed_requests_total, and logged as one short line at most every LOG_EVERY_S.

aiohttp's own handling logged each at ERROR with a traceback and the offending bytes quoted (about 8 KB each: 6,275
such requests in 5 s grew the log 54 MB, a bearer token in a broken header line was logged with it) and answered
them with those bytes in a text/plain body.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from prometheus_client import Counter

from serving.frontend.openai_errors import OpenAIError

log = logging.getLogger("omnigen2.http")
LOG_EVERY_S = 10.0
# aiohttp's description of the error, before the first quote (": b'...'", a repr, or "method in status line
# 'sk-...'": the request's own bytes); only a quoted name of the headers aiohttp refuses twice ("Duplicate 'Host'
# header found.") is kept, any other quoted word may be a caller's secret.
_QUOTE = re.compile(r"'([A-Za-z-]{1,30})'|['\"]")
_HEADER_NAMES = frozenset(
    [
        "content-length",
        "content-location",
        "content-range",
        "content-type",
        "etag",
        "host",
        "max-forwards",
        "server",
        "transfer-encoding",
        "user-agent",
    ]
)


def reason(error: HttpProcessingError) -> str:
    """What aiohttp's parser found wrong, without any of the request's bytes."""
    text = error.message.split(":", 1)[0]
    quotes = (m.start() for m in _QUOTE.finditer(text) if not (m[1] and m[1].lower() in _HEADER_NAMES))
    text = text[: next(quotes, len(text))]
    text = "".join(c for c in text if c.isprintable()).strip().rstrip(".")
    return text[:80] or type(error).__name__


class MalformedRequests:
    """Counts them, and logs the first, then at most one line every `every_s` with how many were not logged."""

    def __init__(
        self, counter: Counter, every_s: float = LOG_EVERY_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.counter = counter
        self.every_s = every_s
        self.clock = clock
        self.logged_at: float | None = None
        self.unlogged = 0

    def seen(self, remote: str | None, error: HttpProcessingError) -> str:
        """Records one; returns its reason."""
        why = reason(error)
        self.counter.inc()
        now = self.clock()
        if self.logged_at is not None and now - self.logged_at < self.every_s:
            self.unlogged += 1
            return why
        more = f"; {self.unlogged} more since the last such line" if self.unlogged else ""
        log.warning("a request from %s does not parse as HTTP/1.1 (%s): answered 400%s", remote or "-", why, more)
        self.logged_at, self.unlogged = now, 0
        return why


class ParseErrorHandler(RequestHandler):
    """aiohttp's protocol for one connection, its parser errors handled by `malformed` (above); every other error
    as aiohttp handles it."""

    __slots__ = ("malformed",)

    def __init__(self, manager: web.Server, malformed: MalformedRequests, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.malformed = malformed

    def handle_error(
        self, request: BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        # Once part of an answer went out another cannot follow: aiohttp's own handling raises ConnectionError then;
        # a 500 is no parser error.
        if not isinstance(exc, HttpProcessingError) or status == 500 or request.writer.output_size > 0:
            return super().handle_error(request, status, exc, message)
        why = self.malformed.seen(request.remote, exc)
        error = OpenAIError(status, f"the request does not parse as HTTP/1.1: {why}", code="malformed_request")
        response = web.json_response(error.body(), status=status)
        response.force_close()
        return response

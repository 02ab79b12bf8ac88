"""Requests whose request line or headers do not parse (serving/frontend/http_malformed.py), sent to the OpenAI
gateway with no gRPC service behind it: each is answered 400 in OpenAI's error shape without its bytes, counted, and
logged as one short line at most every LOG_EVERY_S. Before: aiohttp logged each at ERROR with a traceback and about
8 KB of the request (6,275 in 5 s grew the log 54 MB; a bearer token in a broken header line was logged), answered
in text/plain with the same bytes, and neither the access log nor omnigen2_http_requests counted them."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, BadHttpMethod, BadStatusLine, InvalidHeader, LineTooLong
from aiohttp.test_utils import make_mocked_request

from serving.frontend import http_malformed
from serving.frontend.config import FrontendConfig
from serving.frontend.http_malformed import MalformedRequests, ParseErrorHandler
from serving.frontend.metrics import Metrics
from serving.frontend.openai_http import OpenAIGateway

FLOOD = b"GET / HTTP/1.1\r\nHost: x\r\nX: \x01" + b"A" * 8000 + b"\r\n\r\n"
SECRET = "alpha-SECRET-1234"
TOKEN_LINES = [
    f"Authorization: Bearer {SECRET}\x01".encode(),  # a control character in the value
    f"Authorization : Bearer {SECRET}".encode(),  # a space before the colon
]


async def _answers(port: int, request: bytes, count: int) -> list[bytes]:
    """What the gateway answers `count` connections that each send `request` (each answer closes its connection)."""
    answers = []
    for _ in range(count):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        answers.append(await reader.read())
        writer.close()
    return answers


def _sent(request: bytes, count: int) -> tuple[list[bytes], float]:
    """The answers, and omnigen2_http_malformed_requests_total after them."""

    async def run() -> tuple[list[bytes], float]:
        metrics = Metrics()
        gateway = OpenAIGateway(FrontendConfig(), "unix:unused", metrics)
        port = await gateway.start("127.0.0.1:0")
        try:
            answers = await _answers(port, request, count)
        finally:
            await gateway.stop()
        counted = metrics.registry.get_sample_value("omnigen2_http_malformed_requests_total")
        return answers, counted or 0.0

    return asyncio.run(run())


def test_a_flood_of_malformed_requests_is_logged_as_one_short_line_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    answers, counted = _sent(FLOOD, 20)
    assert counted == 20
    for answer in answers:  # aiohttp answers a request it could not parse as HTTP/1.0
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 400 ") and b"application/json" in head, head
        error = json.loads(body)["error"]
        assert error["code"] == "malformed_request" and b"AAAA" not in answer, error
    records = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(records) == 1, [r.getMessage()[:200] for r in records]  # all within LOG_EVERY_S of the first
    (line,) = records
    assert line.name == "omnigen2.http" and line.exc_info is None
    assert "\n" not in line.getMessage() and len(line.getMessage()) < 200, line.getMessage()


@pytest.mark.parametrize("header", TOKEN_LINES, ids=["control-character", "space-before-colon"])
def test_a_token_in_a_broken_header_is_neither_logged_nor_answered(
    header: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    (answer,), counted = _sent(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + header + b"\r\n\r\n", 1)
    assert SECRET.encode() not in answer
    assert SECRET not in caplog.text
    assert answer.startswith(b"HTTP/1.0 400 ") and counted == 1


def test_after_the_quiet_period_one_line_says_how_many_were_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    malformed = MalformedRequests(Metrics().http_malformed_requests, every_s=10.0, clock=lambda: now[0])
    error = BadHttpMessage("Invalid header value char:\n\n  b'X: \\x01AAAA'\n      ^")
    for at in (0.0, 1.0, 2.0, 9.9, 10.0):
        now[0] = at
        malformed.seen("10.0.0.1", error)
    lines = [r.getMessage() for r in caplog.records if r.name == "omnigen2.http"]
    assert len(lines) == 2 and "Invalid header value char" in lines[0] and "AAAA" not in "".join(lines)
    assert "3 more since the last such line" in lines[1]


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (LineTooLong(b"X: " + b"A" * 100 + b"...", 8190), "Got more than 8190 bytes when reading"),
        (InvalidHeader(b"Bearer alpha-SECRET-1234"), "Invalid HTTP header"),
        (BadStatusLine("GET /x HTTP/9 secret"), "Bad status line"),
        (BadHttpMessage("Duplicate 'Host' header found."), "Duplicate 'Host' header found"),
        (BadHttpMessage("Duplicate 'HOST' header found."), "Duplicate 'HOST' header found"),
        (BadHttpMessage("\x01\x02"), "BadHttpMessage"),
        # aiohttp's pure-Python parser (AIOHTTP_NO_EXTENSIONS) quotes the method it was sent
        (BadHttpMethod("sk-secret"), "Bad HTTP method in status line"),
        (BadHttpMessage("Bad 'sk-secret' and 'Host'"), "Bad"),
    ],
)
def test_the_reason_keeps_aiohttps_words_without_the_requests_bytes(error: BadHttpMessage, reason: str) -> None:
    assert http_malformed.reason(error) == reason


@pytest.mark.parametrize(("status", "sent"), [(400, 100), (500, 0)], ids=["answer-started", "server-error"])
def test_aiohttp_handles_what_is_no_parser_error_before_an_answer(status: int, sent: int) -> None:
    """Once part of an answer went out, aiohttp raises ConnectionError rather than send a second one; before, the
    handler answered 400 after it."""

    async def handled() -> web.StreamResponse:
        server = web.Server(lambda request: web.Response())
        handler = ParseErrorHandler(
            server, MalformedRequests(Metrics().http_malformed_requests), loop=asyncio.get_running_loop()
        )
        request = make_mocked_request("GET", "/", writer=_Writer(sent))
        return handler.handle_error(request, status, BadHttpMessage("bad"))

    if sent:
        with pytest.raises(ConnectionError):
            asyncio.run(handled())
    else:
        assert asyncio.run(handled()).content_type == "text/plain"  # aiohttp's own 500


class _Writer:
    """What handle_error reads of a request's writer."""

    def __init__(self, output_size: int) -> None:
        self.output_size = output_size

"""Bodies an attack on the OpenAI gateway sent (serving/frontend/openai_http.py), with a stand-in for the gRPC
service (no Triton): each is refused 400 in the project's own words, naming what is wrong without echoing the
caller's bytes at length or Python's internals."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from omnigen2.v1 import omnigen2_pb2 as pb

from serving.frontend.config import FrontendConfig
from serving.frontend.metrics import Metrics
from serving.frontend.openai_http import OpenAIGateway


class Service:
    """Answers Generate with an empty response, counting the calls."""

    def __init__(self) -> None:
        self.calls = 0

    async def Generate(self, message: pb.GenerateRequest, metadata: Any) -> pb.GenerateResponse:  # noqa: N802 (the stub's name)
        self.calls += 1
        return pb.GenerateResponse()


def post(
    route: str, body: bytes, headers: dict[str, str], config: FrontendConfig | None = None
) -> tuple[int, dict[str, Any], int]:
    """The status and body of one POST to a gateway on 127.0.0.1, and how many calls reached the service."""

    async def run() -> tuple[int, dict[str, Any], int]:
        gateway = OpenAIGateway(config or FrontendConfig(), "unix:unused", Metrics())
        port = await gateway.start("127.0.0.1:0")
        service = Service()
        gateway.stub = service  # type: ignore[assignment]
        try:
            async with aiohttp.ClientSession(skip_auto_headers=["User-Agent"]) as session:
                url = f"http://127.0.0.1:{port}{route}"
                async with session.post(url, data=body, headers=headers) as response:
                    return response.status, await response.json(), service.calls
        finally:
            await gateway.stop()

    return asyncio.run(run())


def form(*parts: tuple[str, str, bytes]) -> tuple[bytes, dict[str, str]]:
    """A multipart body of (name, part headers, value) parts, and its Content-Type."""
    body = b"".join(
        b'--b\r\nContent-Disposition: form-data; name="'
        + name.encode()
        + b'"\r\n'
        + extra.encode()
        + b"\r\n"
        + value
        + b"\r\n"
        for name, extra, value in parts
    )
    return body + b"--b--\r\n", {"Content-Type": "multipart/form-data; boundary=b"}


def test_a_text_part_in_an_unknown_charset_is_refused_400() -> None:
    """Before: 500 "internal error" and an ERROR traceback (LookupError from aiohttp's post())."""
    body, headers = form(("prompt", "Content-Type: text/plain; charset=no-such-codec\r\n", b"x"))
    status, answer, calls = post("/v1/images/edits", body, headers)
    assert (status, answer["error"]["code"], calls) == (400, "invalid_body", 0), answer
    assert "charset" in answer["error"]["message"] and "no-such-codec" in answer["error"]["message"]


def test_a_long_unknown_field_name_is_cut_in_the_answer() -> None:
    """Before: a 100 KB key came back whole, twice (message and param)."""
    key = "k" * 100_000
    body = json.dumps({"prompt": "x", key: 1}).encode()
    status, answer, calls = post("/v1/images/generations", body, {"Content-Type": "application/json"})
    assert (status, answer["error"]["code"], calls) == (400, "unknown_parameter", 0)
    assert len(json.dumps(answer)) < 500 and answer["error"]["param"].startswith("kkk")


def test_a_repeated_long_form_name_is_cut_in_the_answer() -> None:
    body, headers = form(("n" * 4000 + "[]", "", b"1"))
    status, answer, calls = post("/v1/images/edits", body, headers)
    assert (status, calls) == (400, 0) and len(json.dumps(answer)) < 500, answer


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", "an integer of over 4300 digits"),
        (b"[" * 100_000 + b"]" * 100_000, "nest deeper than any request's"),
        (b'{"prompt": NaN}', "NaN is not JSON"),
        (b'{"prompt": ', "Expecting value"),
    ],
    ids=["digits", "depth", "nan", "cut"],
)
def test_json_that_python_cannot_read_is_refused_in_the_projects_words(body: bytes, reason: str) -> None:
    """Before: "use sys.set_int_max_str_digits() to increase the limit", "maximum recursion depth exceeded"."""
    status, answer, _ = post("/v1/images/generations", body, {"Content-Type": "application/json"})
    message = answer["error"]["message"]
    assert (status, answer["error"]["code"]) == (400, "invalid_json") and reason in message, message
    assert "sys." not in message and "recursion" not in message

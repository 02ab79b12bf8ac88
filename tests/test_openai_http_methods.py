"""A route asked with a method it does not take (serving/frontend/openai_http.py), with no gRPC service behind
it: 405 in OpenAI's error shape, with the `Allow` header RFC 9110 requires (the gateway's error body dropped it)."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from serving.frontend.config import FrontendConfig
from serving.frontend.metrics import Metrics
from serving.frontend.openai_http import OpenAIGateway


@pytest.mark.parametrize(
    ("method", "route", "allowed"),
    [
        ("GET", "/v1/images/generations", {"POST"}),
        ("PUT", "/v1/chat/completions", {"POST"}),
        ("POST", "/v1/models", {"GET", "HEAD"}),
    ],
)
def test_a_method_not_allowed_names_the_allowed_ones(method: str, route: str, allowed: set[str]) -> None:
    async def run() -> tuple[int, str, str | None]:
        gateway = OpenAIGateway(FrontendConfig(), "unix:unused", Metrics())
        port = await gateway.start("127.0.0.1:0")
        try:
            url = f"http://127.0.0.1:{port}{route}"
            async with aiohttp.ClientSession() as session, session.request(method, url, json={}) as response:
                answer = await response.json()
                return response.status, answer["error"]["code"], response.headers.get("Allow")
        finally:
            await gateway.stop()

    status, code, allow = asyncio.run(run())
    assert (status, code) == (405, "method_not_allowed")
    assert allow is not None and {m.strip() for m in allow.split(",")} == allowed

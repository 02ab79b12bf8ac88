"""The OpenAI gateway takes request bodies as sent (serving/frontend/openai_http.py), with a stand-in for the gRPC
service (no Triton): a compressed body is refused 415 unread. Before, aiohttp inflated `Content-Encoding: gzip`
bodies while the size limit applied to the compressed bytes they came as: 81 KB became 84 MB in the gateway."""

from __future__ import annotations

import asyncio
import gzip
import json
import zlib
from typing import Any

import aiohttp
import pytest
from omnigen2.v1 import omnigen2_pb2 as pb

from serving.frontend.config import FrontendConfig
from serving.frontend.metrics import Metrics
from serving.frontend.openai_http import OpenAIGateway

BODY = json.dumps({"prompt": "x"}).encode()
ENCODED = {"gzip": gzip.compress(BODY), "deflate": zlib.compress(BODY), "br": BODY, "x-unknown": BODY}


class Service:
    """Answers Generate with an empty response, counting the calls."""

    def __init__(self) -> None:
        self.calls = 0

    async def Generate(self, message: pb.GenerateRequest, metadata: Any) -> pb.GenerateResponse:  # noqa: N802 (the stub's name)
        self.calls += 1
        return pb.GenerateResponse()


def _post(route: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any], dict[str, str], int]:
    """The status, error body and headers of one POST, and how many calls reached the service."""

    async def run() -> tuple[int, dict[str, Any], dict[str, str], int]:
        gateway = OpenAIGateway(FrontendConfig(), "unix:unused", Metrics())
        port = await gateway.start("127.0.0.1:0")
        service = Service()
        gateway.stub = service  # type: ignore[assignment]
        try:
            async with aiohttp.ClientSession(auto_decompress=False) as session:
                url = f"http://127.0.0.1:{port}{route}"
                async with session.post(url, data=body, headers=headers) as response:
                    answer = await response.json()
                    return response.status, answer, dict(response.headers), service.calls
        finally:
            await gateway.stop()

    return asyncio.run(run())


@pytest.mark.parametrize("encoding", list(ENCODED))
def test_a_compressed_json_body_is_refused_unread(encoding: str) -> None:
    """Before: the gzip and deflate bodies were inflated, parsed and called Generate (200)."""
    headers = {"Content-Type": "application/json", "Content-Encoding": encoding}
    status, answer, got, calls = _post("/v1/images/generations", ENCODED[encoding], headers)
    assert status == 415 and calls == 0, (status, answer)
    assert got["Accept-Encoding"] == "identity"
    assert answer["error"]["code"] == "unsupported_content_encoding"
    assert f"Content-Encoding {encoding}" in answer["error"]["message"]


def test_a_compressed_form_is_refused_unread() -> None:
    form = (
        b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nx\r\n'
        b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\npng\r\n--b--\r\n'
    )
    headers = {"Content-Type": "multipart/form-data; boundary=b", "Content-Encoding": "gzip"}
    status, answer, _, calls = _post("/v1/images/edits", gzip.compress(form), headers)
    assert status == 415 and calls == 0, (status, answer)


@pytest.mark.parametrize("encoding", ["identity", "Identity", ""])
def test_an_identity_body_is_taken(encoding: str) -> None:
    headers = {"Content-Type": "application/json", "Content-Encoding": encoding}
    status, answer, _, calls = _post("/v1/images/generations", BODY, headers)
    assert status == 200 and calls == 1, (status, answer)

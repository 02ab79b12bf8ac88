"""The OpenAI gateway in process with a stand-in for the gRPC service (no Triton), for tests that send it one
request: what it answers, and whether the request reached the service."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from omnigen2.v1 import omnigen2_pb2 as pb

from serving.frontend.config import FrontendConfig
from serving.frontend.metrics import Metrics
from serving.frontend.openai_http import OpenAIGateway


class ImageService:
    """Answers Generate with an empty response, counting the calls."""

    def __init__(self) -> None:
        self.calls = 0

    async def Generate(self, message: pb.GenerateRequest, metadata: Any) -> pb.GenerateResponse:  # noqa: N802 (the stub's name)
        self.calls += 1
        return pb.GenerateResponse()


def gateway_post(
    route: str,
    body: bytes,
    headers: dict[str, str],
    config: FrontendConfig | None = None,
    listen: str = "127.0.0.1:0",
) -> tuple[int, dict[str, Any], int]:
    """The status and JSON body of one POST to a gateway listening on `listen` (reached on 127.0.0.1), and how
    many calls reached the service."""
    status, answer, _, calls = gateway_answer(route, body, headers, config, listen)
    return status, answer, calls


def gateway_answer(
    route: str,
    body: bytes,
    headers: dict[str, str],
    config: FrontendConfig | None = None,
    listen: str = "127.0.0.1:0",
) -> tuple[int, dict[str, Any], dict[str, str], int]:
    """`gateway_post`'s answer with its headers too; the client inflates nothing, so a body comes as it was sent."""

    async def run() -> tuple[int, dict[str, Any], dict[str, str], int]:
        gateway = OpenAIGateway(config or FrontendConfig(), "unix:unused", Metrics())
        port = await gateway.start(listen)
        service = ImageService()
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


def multipart(*parts: tuple[str, str, bytes]) -> tuple[bytes, dict[str, str]]:
    """A multipart body of (name, part header lines, value) parts, and its Content-Type header. A part named
    `image` is a file part."""
    body = b""
    for name, extra, value in parts:
        filename = b'; filename="a.png"' if name == "image" else b""
        disposition = b'Content-Disposition: form-data; name="' + name.encode() + b'"' + filename + b"\r\n"
        body += b"--b\r\n" + disposition + extra.encode() + b"\r\n" + value + b"\r\n"
    return body + b"--b--\r\n", {"Content-Type": "multipart/form-data; boundary=b"}

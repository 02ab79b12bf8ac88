"""The OpenAI gateway bounds a JSON body's values before it parses it (serving/frontend/openai_http.py), with no
gRPC service behind it: the body is refused before any call."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from serving.frontend.config import FrontendConfig
from serving.frontend.metrics import Metrics
from serving.frontend.openai_http import MAX_JSON_COMMAS, OpenAIGateway

VALUES = 20_000_000  # 40 MB of JSON: json.loads took 1-3 s, holding the GIL


def test_a_body_of_millions_of_values_is_refused_without_stalling_the_event_loop() -> None:
    """json.loads holds the GIL on its worker thread too: before, a body of 20 million values held the event loop
    (every other caller) for as long as it was parsed, and was then refused as not a JSON object."""

    async def run() -> tuple[int, str, float]:
        gateway = OpenAIGateway(FrontendConfig(), "unix:unused", Metrics())
        port = await gateway.start("127.0.0.1:0")
        body = b"[" + b"1," * (VALUES - 1) + b"1]"
        slowest = 0.0
        try:
            async with aiohttp.ClientSession() as session:
                post = session.post(
                    f"http://127.0.0.1:{port}/v1/chat/completions",
                    data=body,
                    headers={"Content-Type": "application/json"},
                )
                answer = asyncio.ensure_future(post)
                while not answer.done():
                    start = time.monotonic()
                    await asyncio.sleep(0.01)
                    slowest = max(slowest, time.monotonic() - start - 0.01)
                response = await answer
                return response.status, (await response.json())["error"]["message"], slowest
        finally:
            await gateway.stop()

    status, message, slowest = asyncio.run(run())
    assert slowest < 0.5, f"the event loop stalled {slowest:.2f} s"
    assert status == 400 and f"over {MAX_JSON_COMMAS} commas" in message

"""A call that reaches Triton while a model is between its unload and its load again ends UNAVAILABLE, which the SDK
retries, not INTERNAL.

The watchdog reloads a model whose stub died (unload, then load); the front end's health poll may not have seen the
model go when a call arrives, and Triton answers it 'Request for unknown model: ... has no available versions'. A
test that killed a stub and called once health said SERVING again got INTERNAL that way. Here the window is held
open: the shared server's watchdog is paused, the BLS model unloaded, and the front end's Triton link called directly
(through the front end's process its health gate could answer first)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc
import pytest
from omnigen2.v1 import omnigen2_pb2 as pb

from serving.frontend.convert import to_forward
from serving.frontend.process import FrontendProcess
from serving.frontend.status import ApiError
from serving.frontend.triton_backend import TritonBackend
from serving.pipeline.request import Limits
from serving.triton.launcher import TritonServer
from serving.triton.model_names import BLS_MODEL
from tests.integration.watchdog_pause import watchdog_paused


@pytest.fixture
def bls_unloaded(triton: TritonServer, api: FrontendProcess) -> Iterator[None]:
    """The BLS model unloaded, with nothing to load it back until the test ends (watchdog_pause.py)."""
    with watchdog_paused(triton, api, BLS_MODEL) as admin:
        admin.unload_model(BLS_MODEL)
        yield


async def _generate(url: str) -> ApiError:
    backend = TritonBackend(url, max_message_bytes=64 << 20, retry_after_s=1.0)
    forward = to_forward(pb.GenerateRequest(prompt="A red apple", width=32, height=32, steps=1), Limits())
    try:
        with pytest.raises(ApiError) as raised:
            async for _ in backend.generate(forward, run_s=30):
                pass
    finally:
        await backend.close()
    return raised.value


@pytest.mark.usefixtures("bls_unloaded")
def test_a_call_to_a_model_being_loaded_again_is_unavailable(triton: TritonServer) -> None:
    error = asyncio.run(_generate(triton.grpc_url))
    assert error.code is grpc.StatusCode.UNAVAILABLE, error.status.details
    assert "being loaded again; retry the call" in error.status.details
    assert f"'{BLS_MODEL}' has no available versions" in error.status.details  # Triton's own words, kept

"""What `make serve` tells its operator: the banner only once health says SERVING (a "warming up" line before it),
and the end of the drain. No Triton: a stand-in answers readiness."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

import pytest

from serving.frontend.config import FrontendConfig
from serving.frontend.server import serve
from serving.frontend.triton_backend import TritonBackend
from serving.frontend.warmup import Warmup
from serving.triton.ports import free_port


def test_serving_is_announced_when_health_says_serving_not_when_the_ports_are_bound(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[str] = []

    async def triton_ready(self: TritonBackend) -> bool:
        return True

    async def warm_up(self: Warmup) -> str:
        calls.append("warming")
        await asyncio.sleep(0.5)
        calls.append("warm")
        return "ok"

    def serving() -> None:
        calls.append("serving")
        os.kill(os.getpid(), signal.SIGTERM)  # serve() drains and returns

    monkeypatch.setattr(TritonBackend, "ready", triton_ready)
    monkeypatch.setattr(Warmup, "run", warm_up)
    config = FrontendConfig(
        listen=f"127.0.0.1:{free_port()}", metrics_port=0, health_interval_s=0.05, shutdown_grace_s=1.0
    )
    with caplog.at_level(logging.INFO, "omnigen2.frontend"):
        asyncio.run(serve(config, ready=lambda: calls.append("bound"), serving=serving))
    assert sorted(calls[:2]) == ["bound", "warming"] and calls[2:] == ["warm", "serving"]
    assert "front end stopped: no call in flight" in caplog.messages[-1]


def test_serving_is_not_announced_while_triton_is_not_ready() -> None:
    calls: list[str] = []

    def ready() -> None:
        calls.append("bound")
        asyncio.get_running_loop().call_later(0.3, os.kill, os.getpid(), signal.SIGTERM)

    unused = f"127.0.0.1:{free_port()}"  # health polls it; nothing answers
    config = FrontendConfig(listen=f"127.0.0.1:{free_port()}", triton_url=unused, metrics_port=0, shutdown_grace_s=1.0)
    asyncio.run(serve(config, ready=ready, serving=lambda: calls.append("serving")))
    assert calls == ["bound"]

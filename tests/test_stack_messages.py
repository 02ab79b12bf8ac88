"""What `make serve` tells its operator: the banner only once health says SERVING (a "warming up" line before it),
and the end of the drain. No Triton: a stand-in answers readiness."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from types import SimpleNamespace

import pytest

from serving.frontend.config import FrontendConfig
from serving.frontend.server import serve
from serving.frontend.triton_backend import TritonBackend
from serving.frontend.warmup import Warmup
from serving.stack import usage
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


@pytest.mark.parametrize("secured", [False, True], ids=["plain", "tls-and-tokens"])
def test_the_banners_commands_match_the_stacks_tls_and_tokens(secured: bool) -> None:
    """Before: with TLS and tokens on, it still suggested `curl http://...` and CLI commands without --tls-ca or
    --token, which that stack refuses."""
    extra = {"tls_cert": "/etc/og2/cert.pem", "tls_key": "/etc/og2/key.pem", "auth_tokens": "/etc/og2/tokens.json"}
    config = FrontendConfig(listen="127.0.0.1:50051", http_listen="127.0.0.1:8080", **(extra if secured else {}))  # type: ignore[arg-type]
    triton = SimpleNamespace(grpc_url="127.0.0.1:8001", log_path="/tmp/triton.log")
    banner = usage(config, triton, on_gpu=True)  # type: ignore[arg-type]
    commands = [line.strip() for line in banner.splitlines() if line.strip().startswith((".venv/bin/omnigen2", "curl"))]
    assert len(commands) == 4
    if secured:
        assert all('--tls-ca /etc/og2/cert.pem --token "$TOKEN"' in c for c in commands[:3]), commands
        assert (
            commands[3]
            == 'curl -s --cacert /etc/og2/cert.pem -H "Authorization: Bearer $TOKEN" https://127.0.0.1:8080/v1/models'
        )
        assert "HTTP     https://127.0.0.1:8080/v1" in banner
    else:
        assert not any("--tls" in c or "TOKEN" in c for c in commands) and commands[3].endswith(
            "http://127.0.0.1:8080/v1/models"
        )


@pytest.mark.parametrize(("listen", "opt_out"), [("10.0.0.5:50051", True), ("0.0.0.0:50051", False)])
def test_the_banner_adds_the_cleartext_opt_out_only_where_the_cli_needs_it(listen: str, opt_out: bool) -> None:
    """Tokens without TLS on an address the CLI cannot tell is this machine: before, the banner's commands were
    refused by the CLI (a token in cleartext beyond this machine)."""
    config = FrontendConfig(listen=listen, http_listen="", auth_tokens="/etc/og2/tokens.json")  # type: ignore[arg-type]
    triton = SimpleNamespace(grpc_url="127.0.0.1:8001", log_path="/tmp/triton.log")
    commands = [line for line in usage(config, triton, on_gpu=True).splitlines() if "omnigen2 --server" in line]  # type: ignore[arg-type]
    assert len(commands) == 3
    assert all(("--allow-plaintext-token" in c) is opt_out for c in commands), commands

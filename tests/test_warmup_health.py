"""Health and the warm-up, with a stand-in for Triton's readiness and for the warm-up (no Triton): NOT_SERVING
while it runs and the poll still answers, SERVING when it ends, again after Triton was away, and a shutdown
during a warm-up that never ends does not wait for it. Also the settings that turn it off or refuse it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import cast

import pytest
from grpc_health.v1 import health_pb2

from serving import stack
from serving.errors import SettingError
from serving.frontend.config import FrontendConfig
from serving.frontend.health import LIVENESS, SERVICE, TritonHealth
from serving.frontend.metrics import Metrics
from serving.frontend.triton_backend import TritonBackend
from serving.frontend.warmup import Warmup

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


class StandIn:
    """Triton's readiness, set by the test; and a warm-up that ends when the test says so."""

    def __init__(self) -> None:
        self.is_ready = True
        self.warm_ups = 0
        self.cancelled = 0
        self.release = asyncio.Event()

    async def ready(self) -> bool:
        return self.is_ready

    async def warm_up(self) -> None:
        self.warm_ups += 1
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        self.release.clear()


async def _status(health: TritonHealth, service: str) -> int:
    request = health_pb2.HealthCheckRequest(service=service)
    return int((await health.servicer.Check(request, None)).status)


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_serving_only_once_warmed_and_warmed_again_after_triton_was_away() -> None:
    async def run() -> None:
        triton = StandIn()
        health = TritonHealth(cast(TritonBackend, triton), 0.01, triton.warm_up)
        assert not await health.refresh()  # ready, warming: the poll answers at once
        assert await _status(health, "") == NOT_SERVING and await _status(health, LIVENESS) == SERVING
        await _settle()
        assert not await health.refresh() and triton.warm_ups == 1  # one warm-up at a time
        triton.release.set()
        await _settle()
        assert health.serving and await _status(health, SERVICE) == SERVING  # at its end, not at the next poll

        triton.is_ready = False
        assert not await health.refresh()
        triton.is_ready = True
        assert not await health.refresh()
        await _settle()
        assert triton.warm_ups == 2
        triton.is_ready = False  # away again mid-warm-up: it is stopped, and its end does not say SERVING
        await health.refresh()
        await _settle()
        assert triton.cancelled == 1 and not health.serving
        triton.is_ready = True
        await health.refresh()
        triton.release.set()
        await _settle()
        assert triton.warm_ups == 3 and health.serving
        await health.shutdown()
        await health.wait_closed()

    asyncio.run(run())


def test_without_a_warm_up_serving_follows_triton() -> None:
    async def run() -> None:
        triton = StandIn()
        health = TritonHealth(cast(TritonBackend, triton), 0.01)
        assert await health.refresh() and await _status(health, "") == SERVING
        triton.is_ready = False
        assert not await health.refresh()

    asyncio.run(run())


def test_a_broken_warm_up_still_turns_serving() -> None:
    async def broken() -> None:
        raise RuntimeError("a bug in the warm-up")

    async def run() -> None:
        health = TritonHealth(cast(TritonBackend, StandIn()), 0.01, broken)
        await health.refresh()
        await _settle()
        assert health.serving

    asyncio.run(run())


def test_shutdown_during_a_warm_up_does_not_wait_for_it() -> None:
    async def run() -> None:
        triton = StandIn()
        health = TritonHealth(cast(TritonBackend, triton), 0.01, triton.warm_up)
        watch = asyncio.create_task(health.watch())
        await asyncio.sleep(0.05)
        started = time.monotonic()
        await health.shutdown()
        await health.wait_closed()
        assert time.monotonic() - started < 1 and triton.cancelled == 1
        assert await _status(health, "") == NOT_SERVING
        await asyncio.sleep(0.05)  # the poll goes on until cancelled, and starts no new warm-up
        assert triton.warm_ups == 1
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch

    asyncio.run(run())


def test_the_warmup_flag_and_its_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    assert FrontendConfig.from_args([]).warmup
    assert not FrontendConfig.from_args(["--no-warmup"]).warmup
    monkeypatch.setenv("OMNIGEN2_WARMUP", "off")
    assert not FrontendConfig.from_args([]).warmup
    assert FrontendConfig.from_args(["--warmup"]).warmup
    monkeypatch.setenv("OMNIGEN2_WARMUP", "maybe")
    with pytest.raises(SettingError, match="OMNIGEN2_WARMUP"):
        FrontendConfig.from_args([])


@pytest.mark.parametrize(
    ("change", "flag"), [({"warmup_size": 8}, "--warmup-size"), ({"warmup_steps": 0}, "--warmup-steps")]
)
def test_a_warm_up_the_pipeline_would_refuse_is_refused_at_start(change: dict[str, int], flag: str) -> None:
    with pytest.raises(SettingError) as refused:
        Warmup(FrontendConfig(**change), cast(TritonBackend, StandIn()), Metrics())  # type: ignore[arg-type]
    assert refused.value.setting == flag


def test_make_serve_hands_the_warmup_flags_to_the_front_end(monkeypatch: pytest.MonkeyPatch) -> None:
    """`serving.stack` passes the flags it does not know to the front end; `--warmup` is a prefix of its own
    `--warmup-resolutions`, which argparse's abbreviations took it for."""
    parse, seen = FrontendConfig.from_args, []

    class ParsedError(Exception):
        pass

    def record(argv: list[str] | None = None) -> FrontendConfig:
        seen.append(parse(argv))
        raise ParsedError  # stop before anything is built

    monkeypatch.setattr(FrontendConfig, "from_args", record)
    for argv in (["--no-warmup", "--warmup"], ["--warmup-size", "64", "--no-warmup"]):
        with pytest.raises(ParsedError):
            stack.main(argv)
    assert [(c.warmup, c.warmup_size) for c in seen] == [(True, 16), (False, 64)]

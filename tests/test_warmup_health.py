"""Health and the warm-up, with a stand-in for Triton's readiness and for the warm-up (no Triton): NOT_SERVING
while it runs and the poll still answers, SERVING when it ends, again after Triton was away (but not after one
poll it did not answer), and a shutdown during a warm-up that never ends does not wait for it. Also the settings
that turn it off or refuse it, and a warm-up's calls kept out of the callers' metrics."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Callable
from typing import cast

import pytest
from grpc_health.v1 import health_pb2

from serving import stack
from serving.errors import SettingError
from serving.frontend.config import FrontendConfig
from serving.frontend.health import LIVENESS, SERVICE, UNANSWERED_POLLS, TritonHealth
from serving.frontend.metrics import Metrics
from serving.frontend.triton_backend import TritonBackend
from serving.frontend.warmup import Warmup

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


class StandIn:
    """Triton's readiness (True, False: answered not ready, None: no answer), set by the test; and a warm-up that
    ends when the test says so."""

    def __init__(self) -> None:
        self.is_ready: bool | None = True
        self.warm_ups = 0
        self.cancelled = 0
        self.release = asyncio.Event()

    async def ready(self) -> bool | None:
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


def test_a_poll_triton_does_not_answer_is_not_serving_but_does_not_warm_again() -> None:
    """A readiness poll timing out under load: NOT_SERVING for that poll only, SERVING at the next answer with no
    second warm-up (it would queue behind the live work for its whole length, NOT_SERVING meanwhile), and a
    warm-up in progress goes on. Unanswered UNANSWERED_POLLS times in a row (a restart) warms again."""

    async def run() -> None:
        triton = StandIn()
        health = TritonHealth(cast(TritonBackend, triton), 0.01, triton.warm_up)
        await health.refresh()
        await _settle()
        triton.is_ready = None  # one blip while warming: the warm-up is not stopped
        assert not await health.refresh()
        triton.is_ready = True
        assert not await health.refresh()
        triton.release.set()
        await _settle()
        assert health.serving and triton.cancelled == 0 and triton.warm_ups == 1

        for _ in range(UNANSWERED_POLLS - 1):
            triton.is_ready = None
            assert not await health.refresh() and await _status(health, SERVICE) == NOT_SERVING
            triton.is_ready = True
            assert await health.refresh() and await _status(health, SERVICE) == SERVING
        await _settle()
        assert triton.warm_ups == 1

        triton.is_ready = None
        for _ in range(UNANSWERED_POLLS):
            assert not await health.refresh()
        triton.is_ready = True
        assert not await health.refresh()
        await _settle()
        assert triton.warm_ups == 2
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
        triton.is_ready = None
        assert not await health.refresh()
        triton.is_ready = True
        assert await health.refresh()

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
    monkeypatch.setenv("OMNIGEN2_WARMUP", " ")  # set but empty (`OMNIGEN2_WARMUP=`): the default, not off
    assert FrontendConfig.from_args([]).warmup
    assert not FrontendConfig.from_args(["--no-warmup"]).warmup
    monkeypatch.setenv("OMNIGEN2_WARMUP", "maybe")
    with pytest.raises(SettingError, match="OMNIGEN2_WARMUP"):
        FrontendConfig.from_args([])


@pytest.mark.parametrize(
    ("change", "flag", "detail"),
    [
        ({"warmup_size": 8}, "--warmup-size", "must be >= 16 (8)"),  # the config's own check, as the flag's
        ({"warmup_size": 100_000}, "--warmup-size/--warmup-steps", "width: must be in [1, 4096], got 100000"),
        ({"warmup_steps": 0}, "--warmup-steps", "must be >= 1 (0)"),
        ({"warmup_steps": 100_000}, "--warmup-size/--warmup-steps", "steps: must be in [1, 200], got 100000"),
    ],
)
def test_a_warm_up_the_api_would_refuse_is_refused_at_start(change: dict[str, int], flag: str, detail: str) -> None:
    """Validated as a caller's requests are (100 000 px passed a check of the lower bounds only, then every warm-up
    failed); the text-to-image first, so no 100 000 px image is made to find out."""
    with pytest.raises(SettingError) as refused:
        Warmup(FrontendConfig(**change), cast(TritonBackend, StandIn()), Metrics())  # type: ignore[arg-type]
    assert refused.value.setting == flag and detail in refused.value.description


class Unconfirmed:
    """Triton's calls, each running until stopped and then not confirming the stop within the grace period, as
    TritonCall reports it: the caller's `on_grace_expired`, else the backend's (the callers' counter)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    async def _events(self, on_grace_expired: Callable[[], None] | None) -> AsyncGenerator[object, None]:
        try:
            await asyncio.Event().wait()
            yield None
        finally:
            (on_grace_expired or self.metrics.stop_grace_expired.inc)()

    def generate(self, forward: object, run_s: float, on_grace_expired: Callable[[], None] | None = None) -> object:
        return self._events(on_grace_expired)

    understand = generate


def test_a_warm_up_past_its_time_limit_is_not_counted_as_a_callers_expired_grace() -> None:
    metrics = Metrics()
    config = FrontendConfig(warmup_timeout_s=0.05)
    outcome = asyncio.run(Warmup(config, cast(TritonBackend, Unconfirmed(metrics)), metrics).run())
    assert outcome == "timeout"
    assert metrics.registry.get_sample_value("omnigen2_warmups_total", {"outcome": "timeout"}) == 1
    assert metrics.registry.get_sample_value("omnigen2_stop_grace_expired_total") == 0


def test_make_serve_hands_the_warmup_flags_to_the_front_end(monkeypatch: pytest.MonkeyPatch) -> None:
    """`serving.stack` passes the flags it does not know to the front end; `--warmup` is a prefix of its own
    `--warmup-resolutions`, which argparse's abbreviations took it for."""
    parse, seen = FrontendConfig.from_args, []

    class ParsedError(Exception):
        pass

    def record(argv: list[str] | None = None, prog: str = "python -m serving.stack") -> FrontendConfig:
        seen.append(parse(argv, prog))
        raise ParsedError  # stop before anything is built

    monkeypatch.setattr(FrontendConfig, "from_args", record)
    for argv in (["--no-warmup", "--warmup"], ["--warmup-size", "64", "--no-warmup"]):
        with pytest.raises(ParsedError):
            stack.main(argv)
    assert [(c.warmup, c.warmup_size) for c in seen] == [(True, 16), (False, 64)]

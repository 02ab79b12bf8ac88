"""What the front end's /metrics exposes for dashboards, alerts and autoscaling: a real front end in process (its
HTTP API on too, no Triton), read as Prometheus would read it (the registry's text exposition)."""

from __future__ import annotations

import asyncio
from importlib.metadata import version

import grpc
import pytest
from prometheus_client import generate_latest

from serving.frontend.metrics_page import Samples, parse_metrics
from serving.frontend.server import Frontend
from serving.triton.ports import free_port
from tests.frontends import in_process_frontend


def _scrape(frontend: Frontend) -> Samples:
    return parse_metrics(generate_latest(frontend.metrics.registry).decode())


@pytest.fixture(scope="module")
def scraped() -> Samples:
    """One front end with limits of its own, after one GetModelInfo call (UNAVAILABLE: no Triton)."""

    async def run() -> Samples:
        limits = {
            "max_in_flight": 7,
            "max_inflight_input_pixels": 1_000_001,
            "max_inflight_step_tokens": 2_002,
            "max_inflight_chat_tokens": 3_003,
            "max_inflight_output_pixels": 4_000_004,
            "http_max_connections": 55,
            "http_listen": f"127.0.0.1:{free_port()}",
        }
        async with in_process_frontend(**limits) as (frontend, channel):
            info = channel.unary_unary("/omnigen2.v1.OmniGen2/GetModelInfo", lambda b: b, lambda b: b)
            with pytest.raises(grpc.aio.AioRpcError):
                await info(b"", timeout=30)
            return _scrape(frontend)

    return asyncio.run(run())


def test_the_configured_limits_are_exported_beside_what_is_held(scraped: Samples) -> None:
    """saturation = held / limit for each (before: only the held side was exported, the limits not at all)."""
    assert scraped["omnigen2_in_flight_requests", ()] == 0
    assert scraped["omnigen2_max_in_flight_requests", ()] == 7
    for unit, limit in (
        ("input_pixels", 1_000_001),
        ("step_tokens", 2_002),
        ("chat_tokens", 3_003),
        ("output_pixels", 4_000_004),
    ):
        assert scraped[f"omnigen2_admitted_{unit}", ()] == 0
        assert scraped[f"omnigen2_max_admitted_{unit}", ()] == limit
    assert scraped["omnigen2_max_held_request_bytes", (("budget", "uploads"),)] > 0
    assert scraped["omnigen2_max_held_request_bytes", (("budget", "other"),)] > 0
    assert scraped["omnigen2_max_http_connections", ()] == 55


def test_admitted_cost_is_one_series_per_unit(scraped: Samples) -> None:
    """Before: omnigen2_admitted_cost{budget} summed pixels and tokens in one unitless family."""
    assert not [name for name, _ in scraped if name.startswith("omnigen2_admitted_cost")]


def test_request_latency_is_labelled_by_status_code(scraped: Samples) -> None:
    """A refusal is observed apart from the calls served (before: one series per method, refusals included)."""
    labels = (("code", "UNAVAILABLE"), ("method", "GetModelInfo"))
    assert scraped["omnigen2_request_seconds_count", labels] == 1


def test_histogram_buckets_cover_the_longest_calls_and_steps(scraped: Samples) -> None:
    """Request buckets past --max-run-s (600 s; the top was 320 s), step buckets past a full-size CPU step (29-64 s;
    the top was 5 s)."""
    request = [float(dict(labels)["le"]) for name, labels in scraped if name == "omnigen2_request_seconds_bucket"]
    step = [float(dict(labels)["le"]) for name, labels in scraped if name == "omnigen2_denoise_step_seconds_bucket"]
    assert max(le for le in request if le != float("inf")) >= 600
    assert max(le for le in step if le != float("inf")) >= 64


def test_process_and_build_metrics_are_exported_without_created_series(scraped: Samples) -> None:
    names = {name for name, _ in scraped}
    assert {"process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds"} <= names
    assert ("python_info", ()) not in scraped and any(name == "python_info" for name in names)
    assert scraped["omnigen2_build_info", (("version", version("omnigen2-serving")),)] == 1
    assert not [name for name in names if name.endswith("_created")]

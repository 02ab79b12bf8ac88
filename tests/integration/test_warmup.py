"""The warm-up before readiness: health turns SERVING only once a text-to-image, an edit and an Understand call
have run on Triton; a warm-up past its time limit still ends SERVING; --no-warmup skips it. (A Triton restart
warming again is checked in test_faults.py.)"""

from __future__ import annotations

import time
from pathlib import Path

from grpc_health.v1 import health_pb2

from serving.frontend.process import FrontendProcess
from serving.triton.launcher import TritonServer
from tests.integration.triton_stats import executions

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
# The BLS, the component only an edit calls, and the Understand model.
WARMED = ("omnigen2", "vae_encoder", "mllm")


def _executions(triton: TritonServer) -> dict[str, int]:
    return {model: executions(triton, model) for model in WARMED}


def _wait_serving(frontend: FrontendProcess, timeout_s: float = 30.0) -> list[int]:
    """Every status health answered from the start until SERVING."""
    seen = [frontend.health()]
    deadline = time.monotonic() + timeout_s
    while seen[-1] != SERVING:
        assert time.monotonic() < deadline, f"never SERVING: {seen[-5:]}"
        time.sleep(0.05)
        seen.append(frontend.health())
    return seen


def test_serving_only_after_the_warm_up_ran_on_triton(triton: TritonServer, tmp_path: Path) -> None:
    before = _executions(triton)
    with FrontendProcess(triton.grpc_url, tmp_path / "frontend.log") as api:
        _wait_serving(api)
        after = _executions(triton)  # at the first SERVING: the warm-up's calls have run already
        assert all(after[model] > before[model] for model in WARMED), (before, after)
        assert api.health("omnigen2.v1.OmniGen2") == SERVING
        assert api.metric("omnigen2_warmups_total", outcome="ok") == 1
        assert api.metric("omnigen2_warmup_last_outcome", outcome="ok") == 1
        seconds = api.metric("omnigen2_warmup_seconds")
        assert seconds is not None and 0 < seconds < 30
        # Not caller traffic: no request counted, no access-log line.
        assert api.metric("omnigen2_requests_total", method="Generate", code="OK") is None
        log = api.log_path.read_text()
        assert "warm-up done in" in log
        assert "omnigen2.access" not in log


def test_a_warm_up_past_its_time_limit_is_stopped_and_health_turns_serving(
    triton: TritonServer, tmp_path: Path
) -> None:
    """Long generations (256x256, 200 steps) cut at 1 s: SERVING anyway, the timeout counted, and the BLS was asked
    to stop the calls, which it logs under the warm-up's request ids."""
    offset = triton.log_path.stat().st_size
    flags = ("--warmup-size=256", "--warmup-steps=200", "--warmup-timeout-s=1")
    with FrontendProcess(triton.grpc_url, tmp_path / "frontend.log", *flags) as api:
        seen = _wait_serving(api)
        # The warm-up lasts its 1 s limit at least, and the front end answers health within 0.2 s of listening.
        assert seen[0] == NOT_SERVING, seen
        assert api.metric("omnigen2_warmup_last_outcome", outcome="timeout") == 1
        assert api.metric("omnigen2_warmups_total", outcome="ok") is None
        assert "warm-up still running after --warmup-timeout-s=1 s" in api.log_path.read_text()
    with triton.log_path.open("rb") as log:
        log.seek(offset)
        assert b"request_id=warmup-generate-" in log.read()


def test_no_warmup_turns_serving_without_calls(triton: TritonServer, tmp_path: Path) -> None:
    before = _executions(triton)
    with FrontendProcess(triton.grpc_url, tmp_path / "frontend.log", "--no-warmup") as api:
        _wait_serving(api)
        assert _executions(triton) == before
        assert api.metric("omnigen2_warmups_total", outcome="ok") is None

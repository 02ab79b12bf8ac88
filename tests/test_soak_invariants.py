"""The soak's invariant checks (benchmarks/soak/invariants.py) on canned /metrics text, access-log lines and call
records: each passes on a healthy reading and fails, naming what it saw, on the defects the storms found."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks.soak import storm
from benchmarks.soak.__main__ import sigterm_exits
from benchmarks.soak.invariants import (
    check_admission,
    check_call_lines,
    check_counters,
    check_idle,
    check_probes,
    check_processes,
    check_storm,
    parse_access_log,
)
from serving.frontend.metrics_page import parse_metrics

IDLE = """\
# TYPE omnigen2_in_flight_requests gauge
omnigen2_in_flight_requests 0.0
# TYPE omnigen2_http_connections gauge
omnigen2_http_connections 0.0
# TYPE omnigen2_held_request_bytes gauge
omnigen2_held_request_bytes{budget="uploads"} 0.0
omnigen2_held_request_bytes{budget="other"} 0.0
# TYPE omnigen2_admitted_input_pixels gauge
omnigen2_admitted_input_pixels 0.0
# TYPE omnigen2_admitted_step_tokens gauge
omnigen2_admitted_step_tokens 0.0
# TYPE omnigen2_admitted_chat_tokens gauge
omnigen2_admitted_chat_tokens 0.0
# TYPE omnigen2_admitted_output_pixels gauge
omnigen2_admitted_output_pixels 0.0
"""


def counters(generate_ok: int, understand_cancelled: int, http_200: int) -> str:
    return f"""\
# TYPE omnigen2_requests counter
omnigen2_requests_total{{code="OK",method="Generate"}} {generate_ok}.0
omnigen2_requests_total{{code="CANCELLED",method="Understand"}} {understand_cancelled}.0
omnigen2_requests_created{{code="OK",method="Generate"}} 1.79e+09
# TYPE omnigen2_http_requests counter
omnigen2_http_requests_total{{method="POST",route="/v1/images/generations",status="200"}} {http_200}.0
"""


LOG = [
    "2026-11-26T17:10:14.695Z omnigen2.access INFO Generate peer=ipv4:127.0.0.1:37234 client=- status=OK "
    "seconds=0.334 request_id=w1-1-generate prompt_chars=11 images=0 image_bytes=0 size=64x64 steps=10",
    "2026-11-26T17:10:14.701Z omnigen2.access INFO Understand peer=ipv4:127.0.0.1:37234 client=- status=CANCELLED "
    "seconds=1.002 request_id=w1-2-understand messages=1 images=0 image_bytes=0 text_chars=11",
    "2026-11-26T17:10:15.000Z omnigen2.access INFO Generate peer=ipv4:127.0.0.1:37240 client=- status=OK "
    "seconds=0.300 request_id=w1-3-http-image prompt_chars=5 images=0 image_bytes=0 size=64x64 steps=3",
    "2026-11-26T17:10:15.002Z omnigen2.access INFO HTTP POST /v1/images/generations peer=127.0.0.1 status=200 "
    "seconds=0.310 request_id=w1-3-http-image",
    "2026-11-26T17:10:15.003Z omnigen2.frontend INFO something else entirely",
]


def call(kind: str, seen: str | None, by_client: bool = False, killed: bool = True, **fault: float) -> dict[str, Any]:
    """A call record as read_calls gives it; with no `seen`, one that never ended (its worker `killed` in it, or
    left by a worker fault)."""
    ended = seen is not None
    record = {"kind": kind, "fault": fault, "started": 100.0, "t": 101.0, "ended": ended, "by_client": by_client}
    return record | {"worker": "w1"} | ({"seen": seen, "sent": True} if ended else {"killed": killed})


def test_idle_gauges_pass_at_zero_and_name_the_one_left_held() -> None:
    assert check_idle(parse_metrics(IDLE), 0.4).passed
    held = check_idle(parse_metrics(IDLE.replace("chat_tokens 0.0", "chat_tokens 512.0")), 30.2)
    assert not held.passed
    assert held.failures == ["omnigen2_admitted_chat_tokens = 512 after 30.2 s idle"]
    assert held.seen["gauges"]["omnigen2_in_flight_requests"] == 0


def test_counters_equal_log_lines_by_method_and_status() -> None:
    lines = parse_access_log(LOG)
    assert [(line.api, line.what, line.status) for line in lines] == [
        ("grpc", "Generate", "OK"),
        ("grpc", "Understand", "CANCELLED"),
        ("grpc", "Generate", "OK"),
        ("http", "/v1/images/generations", "200"),
    ]
    before, after = parse_metrics(counters(5, 1, 2)), parse_metrics(counters(7, 2, 3))
    assert check_counters(before, after, lines).passed
    # An HTTP stream delivered whole but logged 499 (one of the storms' defects): counted 200, logged 499.
    mislabelled = [*LOG[:3], LOG[3].replace("status=200", "status=499")]
    check = check_counters(before, after, parse_access_log(mislabelled))
    assert not check.passed
    assert "http//v1/images/generations/200: counted 1, logged 0" in check.failures
    # A call counted with no line at all.
    assert not check_counters(before, parse_metrics(counters(8, 2, 3)), lines).passed


def test_one_line_per_call_with_the_status_its_client_saw() -> None:
    lines = parse_access_log(LOG)
    calls = {
        "w1-1-generate": call("generate", "OK"),
        "w1-2-understand": call("understand", "CANCELLED", by_client=True, cancel_after_s=1.0),
        "w1-3-http-image": call("http-image", "200"),
        "w1-4-stream": call("stream", "CANCELLED", by_client=True, cancel_after_s=0.0),  # never left the client
    }
    check = check_call_lines(calls, lines)
    assert check.passed, check.failures
    assert check.seen["unsent_no_line"] == 1
    # A cancel logged DEADLINE_EXCEEDED, and a whole HTTP answer logged 499: both wrong records.
    wrong = [LOG[0], LOG[1].replace("CANCELLED", "DEADLINE_EXCEEDED"), LOG[2], LOG[3].replace("=200", "=499")]
    check = check_call_lines(calls, parse_access_log(wrong))
    assert not check.passed
    assert check.failures == [
        "understand: client saw CANCELLED, logged DEADLINE_EXCEEDED: 1 calls, e.g. w1-2-understand",
        "http-image: client saw 200, logged 499: 1 calls, e.g. w1-3-http-image",
    ]
    # A call its client lost the race on may end as the server chose; a missing or doubled line always fails.
    calls["w1-1-generate"] = call("generate", "CANCELLED", by_client=True, cancel_after_s=0.5)
    calls["w1-5-generate"] = call("generate", None)  # its client was killed mid-call
    check = check_call_lines(calls, parse_access_log([*LOG, LOG[1]]))
    assert check.failures == [
        "understand: 2 lines (client saw CANCELLED): 1 calls, e.g. w1-2-understand",
        "generate: 0 lines (client saw client killed): 1 calls, e.g. w1-5-generate",
    ]


def test_probes_admission_and_processes() -> None:
    assert check_probes([0, 1, 0], {"t2i": 0, "edit": 1}, tolerance=1).passed
    moved = check_probes([0, 3], {"t2i": 0}, tolerance=1)
    assert moved.failures == ["1 of 2 probes in the storm over 1 (worst 3)"]
    assert check_admission(4, ["OK"] * 4, [200] * 4).passed
    held = check_admission(4, ["OK", "OK", "OK", "RESOURCE_EXHAUSTED"], [200, 200, 200, 429])
    assert not held.passed and len(held.failures) == 2
    before = {"front end (1)": 300.0, "tritonserver (2)": 50.0, "stub mllm (3)": 400.0}
    assert check_processes(before, {**before, "front end (1)": 350.0}, 1.5).passed
    restarted = {"front end (1)": 300.0, "tritonserver (9)": 50.0, "stub mllm (10)": 400.0}
    check = check_processes(before, restarted, 1.5)
    assert check.failures == [
        "process gone after the storm: stub mllm (3)",
        "process gone after the storm: tritonserver (2)",
    ]
    assert not check_processes(before, {k: 2 * v for k, v in before.items()}, 1.5).passed


def test_a_call_ended_by_its_deadline_or_cancel_may_never_have_reached_a_handler() -> None:
    """gRPC can settle a deadline or a cancel while the call still waits in its queue for a busy server loop: no
    handler, no line. Counted apart, not failed; a call the server ended, or sent events to, still owes its line."""
    calls = {
        "w1-1-generate": call("generate", "DEADLINE_EXCEEDED", by_client=True, deadline_s=0.05),
        "w1-2-understand": call("understand", "CANCELLED", by_client=True, cancel_after_s=0.1),
        "w1-3-stream": call("stream", "CANCELLED", by_client=True, cancel_after_s=0.0),
    }
    check = check_call_lines(calls, [])
    assert check.passed, check.failures
    assert check.seen["possibly_never_received"] == 2 and check.seen["unsent_no_line"] == 1
    calls |= {
        "w1-4-stream": call("stream", "CANCELLED", by_client=True, stop_after_events=2),
        "w1-5-generate": call("generate", "OK", deadline_s=3.0),
        "w1-6-generate": call("generate", "INTERNAL"),
    }
    check = check_call_lines(calls, [])
    assert check.failures == [
        "stream: 0 lines (client saw CANCELLED): 1 calls, e.g. w1-4-stream",
        "generate: 0 lines (client saw OK): 1 calls, e.g. w1-5-generate",
        "generate: 0 lines (client saw INTERNAL): 1 calls, e.g. w1-6-generate",
    ]


def test_the_storm_ran_as_planned_or_fails_naming_what_did_not() -> None:
    calls = {"w1-1-generate": call("generate", "OK"), "w2-1-stream": call("stream", None) | {"worker": "w2"}}
    exits: dict[str, int | None] = {"w1": 0, "w2": -9, "w3": 0}
    check = check_storm(exits, {"w2"}, [], calls)
    assert check.passed and check.result == "PASS", check.failures
    # A hung worker the storm killed at its end (-9, not one of its planned kills), a worker fault, a call it left.
    left = call("generate", None, killed=False) | {"worker": "w3"}
    error = {"event": "worker-error", "kind": "stream", "error": "RuntimeError('boom')"}
    check = check_storm({**exits, "w3": -9, "w4": 1}, {"w2"}, [error], {**calls, "w3-1-generate": left})
    assert check.failures == [
        "worker w3 exited -9 (its .err file says why)",
        "worker w4 exited 1 (its .err file says why)",
        "1 worker errors, e.g. stream: RuntimeError('boom')",
        "1 calls without an outcome, e.g. w3-1-generate",
    ]
    assert not check_storm(exits, {"w2"}, [], {}).passed
    # The call a worker fault left owes its line too: it is not taken for one its killed client never sent.
    assert not check_call_lines({"w3-1-generate": left | {"t": 100.0}}, []).passed
    assert check_call_lines({"w2-1-stream": call("stream", None) | {"t": 100.0}}, []).passed


def test_checks_without_data_skip_rather_than_pass() -> None:
    no_front_end = check_processes({}, {}, 1.5)
    assert no_front_end.skipped and no_front_end.result == "SKIP"
    assert check_processes({"front end (1)": 300.0}, {}, 1.5).result == "FAIL"
    assert check_admission(4, [], []).result == "SKIP"


def test_no_worker_outlives_a_storm_cut_short(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C (or SIGTERM made SystemExit) mid-storm: the finally kills the workers it had started."""
    started: list[subprocess.Popen[bytes]] = []
    popen = subprocess.Popen  # storm's module attributes are the modules themselves: patched for the test's span

    def sleeper(command: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        started.append(popen([sys.executable, "-c", "import time; time.sleep(60)"], **kwargs))
        return started[-1]

    def interrupt(seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(storm.subprocess, "Popen", sleeper)
    monkeypatch.setattr(storm.time, "sleep", interrupt)
    settings = storm.StormSettings(0, 30.0, 3, 2, "127.0.0.1:1", "http://127.0.0.1:1", tmp_path / "r", tmp_path / "c")
    with pytest.raises(KeyboardInterrupt):
        storm.run_storm(settings, print)
    assert len(started) == 2 and all(process.poll() == -signal.SIGKILL for process in started)


def test_sigterm_is_made_system_exit_and_the_handler_put_back() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as leaving, sigterm_exits():
        os.kill(os.getpid(), signal.SIGTERM)
        signal.sigtimedwait([], 1.0)  # let the handler run
    assert leaving.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before

"""Prometheus metrics of the front end, in a registry of its own (exposed on loopback by default)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from prometheus_client import (
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)

# Up past --max-run-s (600 s by default) and its stop: a call that ran into it has a bucket of its own.
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640, 1280)
# Up to a full-size step on CPU (29-64 s measured), from a tiny one on a GPU (ms).
_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
WARMUP_OUTCOMES = ("ok", "failed", "timeout", "cancelled")  # serving/frontend/warmup.py
# Each in-flight budget (serving/frontend/admission.py's Load fields) as its metric names it: with its unit.
ADMITTED_UNITS = {
    "pixels": "input_pixels",
    "step_tokens": "step_tokens",
    "chat_tokens": "chat_tokens",
    "output_pixels": "output_pixels",
}
# No `_created` series: a sample per labelled series that no dashboard or alert here reads, doubling the counters'.
disable_created_metrics()


def _version() -> str:
    try:
        return version("omnigen2-serving")
    except PackageNotFoundError:  # run from a checkout that was not installed
        return "unknown"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # The process's CPU, memory and open files, and the Python version: as the default registry has them.
        self.registry.register(PROCESS_COLLECTOR)
        self.registry.register(PLATFORM_COLLECTOR)
        self.build_info = Gauge(
            "omnigen2_build_info", "1, labelled with the front end's version", ["version"], registry=self.registry
        )
        self.build_info.labels(_version()).set(1)
        self.requests = Counter(
            "omnigen2_requests", "API calls by method and final status code", ["method", "code"], registry=self.registry
        )
        self.latency = Histogram(
            "omnigen2_request_seconds",
            "API call latency by method and final status code (refusals apart from the calls served)",
            ["method", "code"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "omnigen2_in_flight_requests", "Admitted Generate and Understand calls", registry=self.registry
        )
        self.max_in_flight = Gauge(
            "omnigen2_max_in_flight_requests", "--max-in-flight: admitted calls at most", registry=self.registry
        )
        self.http_requests = Counter(
            "omnigen2_http_requests",
            "OpenAI-compatible HTTP requests by method, route and HTTP status (each also counts as its gRPC call)",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.cut_off = Counter(
            "omnigen2_cut_off_transfers",
            "Calls cut off for a transfer of theirs by API (http, grpc), transfer (body, answer) and reason (stalled:"
            " no byte for its timeout; slow: behind its minimum rate after the grace)",
            ["api", "transfer", "reason"],
            registry=self.registry,
        )
        self.http_connections = Gauge(
            "omnigen2_http_connections", "Open connections of the OpenAI-compatible HTTP API", registry=self.registry
        )
        self.http_connections_refused = Counter(
            "omnigen2_http_connections_refused",
            "HTTP connections answered 503 and closed at once: --http-max-connections were open",
            registry=self.registry,
        )
        self.http_malformed_requests = Counter(
            "omnigen2_http_malformed_requests",
            "HTTP requests whose request line or headers do not parse, answered 400 and closed before any route (not"
            " in omnigen2_http_requests nor the access log)",
            registry=self.registry,
        )
        self.drain_cut_calls = Counter(
            "omnigen2_drain_cut_calls",
            "Calls still running when the stop's grace period (--shutdown-grace-s) ended, cut (UNAVAILABLE), by method",
            ["method"],
            registry=self.registry,
        )
        self.images = Counter("omnigen2_images_generated", "Images returned", registry=self.registry)
        self.stop_grace_expired = Counter(
            "omnigen2_stop_grace_expired",
            "Calls ended early whose model did not confirm the stop within --stop-grace-s (slot given back anyway)",
            registry=self.registry,
        )
        self.held_request_bytes = Gauge(
            "omnigen2_held_request_bytes",
            "Request bytes the gRPC calls hold or have reserved to read, by budget (uploads, other;"
            " --max-held-request-bytes each)",
            ["budget"],
            registry=self.registry,
        )
        self.reads_refused = Counter(
            "omnigen2_reads_refused",
            "Calls refused for their request, by budget and reason: budget (it might not fit in"
            " --max-held-request-bytes; refused unread) or timeout (not received within --request-read-timeout-s)",
            ["budget", "reason"],
            registry=self.registry,
        )
        # Per in-flight budget: what the admitted calls hold, and the budget itself.
        self.admitted: dict[str, Gauge] = {}
        self.max_admitted: dict[str, Gauge] = {}
        for budget, unit in ADMITTED_UNITS.items():
            words = unit.replace("_", " ")
            self.admitted[budget] = Gauge(
                f"omnigen2_admitted_{unit}",
                f"{words.capitalize()} the admitted calls hold against their in-flight budget",
                registry=self.registry,
            )
            self.max_admitted[budget] = Gauge(
                f"omnigen2_max_admitted_{unit}",
                f"--max-inflight-{unit.replace('_', '-')}: {words} the admitted calls may hold",
                registry=self.registry,
            )
        self.max_held_request_bytes = Gauge(
            "omnigen2_max_held_request_bytes",
            "Request bytes the gRPC calls may hold or reserve at once, by budget (uploads, other)",
            ["budget"],
            registry=self.registry,
        )
        self.max_http_connections = Gauge(
            "omnigen2_max_http_connections",
            "--http-max-connections as resolved: open HTTP connections at most (0: no HTTP API)",
            registry=self.registry,
        )
        self.cut_replies = Gauge(
            "omnigen2_cut_reply_bytes",
            "Bytes of the last messages of cut-off gRPC calls, still queued in gRPC until their callers take them or"
            " their connections close; their output pixels stay held against --max-inflight-output-pixels",
            registry=self.registry,
        )
        self.policy_blocked = Counter(
            "omnigen2_policy_blocked",
            "Requests (stage=request) and answers (stage=answer) refused by the prompt policy, by rule id",
            ["rule", "stage"],
            registry=self.registry,
        )
        self.policy_reloads = Counter(
            "omnigen2_policy_reloads", "Policy file reloads on SIGHUP, by result", ["result"], registry=self.registry
        )
        self.images_withheld = Counter(
            "omnigen2_images_withheld", "Images kept back by the safety classifier", registry=self.registry
        )
        self.step = Histogram(
            "omnigen2_denoise_step_seconds",
            "Seconds between consecutive progress events of one generation",
            buckets=_STEP_BUCKETS,
            registry=self.registry,
        )
        self.warmups = Counter(
            "omnigen2_warmups",
            "Warm-ups run when Triton turned ready, by outcome (ok, failed, timeout, cancelled)",
            ["outcome"],
            registry=self.registry,
        )
        self.warmup_seconds = Gauge(
            "omnigen2_warmup_seconds", "Duration of the last warm-up, whatever its outcome", registry=self.registry
        )
        self.warmup_outcome = Gauge(
            "omnigen2_warmup_last_outcome",
            "1 for the last warm-up's outcome, 0 for the others",
            ["outcome"],
            registry=self.registry,
        )

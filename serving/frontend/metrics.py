"""Prometheus metrics of the front end, in a registry of its own (exposed on loopback by default)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
WARMUP_OUTCOMES = ("ok", "failed", "timeout", "cancelled")  # serving/frontend/warmup.py


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "omnigen2_requests", "API calls by method and final status code", ["method", "code"], registry=self.registry
        )
        self.latency = Histogram(
            "omnigen2_request_seconds", "API call latency", ["method"], buckets=_LATENCY_BUCKETS, registry=self.registry
        )
        self.in_flight = Gauge(
            "omnigen2_in_flight_requests", "Admitted Generate and Understand calls", registry=self.registry
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
        self.admitted = Gauge(
            "omnigen2_admitted_cost",
            "Cost the admitted calls hold, by in-flight budget",
            ["budget"],
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

    def serve(self, address: str, port: int) -> None:
        start_http_server(port, addr=address, registry=self.registry)

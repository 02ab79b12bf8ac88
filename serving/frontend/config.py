"""Front-end settings: command-line flags, each with an OMNIGEN2_* environment variable as its default."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields

from serving.pipeline.chat import DEFAULT_CHAT_LIMITS, ChatLimits
from serving.pipeline.request import DEFAULT_LIMITS, Limits

MiB = 1024 * 1024


@dataclass(frozen=True)
class FrontendConfig:
    listen: str = "127.0.0.1:50051"  # loopback unless the operator opens it on purpose
    triton_url: str = "127.0.0.1:8001"
    metrics_address: str = "127.0.0.1"
    metrics_port: int = 9464  # Prometheus text format on http://metrics_address:metrics_port/metrics; 0 = off
    max_in_flight: int = 16  # admitted Generate + Understand calls at once; beyond: RESOURCE_EXHAUSTED
    retry_after_s: float = 1.0  # the RetryInfo delay sent with RESOURCE_EXHAUSTED
    max_request_bytes: int = 64 * MiB  # larger requests: INVALID_ARGUMENT naming the largest field
    max_response_bytes: int = 512 * MiB
    health_interval_s: float = 1.0  # how often Triton's readiness is polled for the health service
    shutdown_grace_s: float = 30.0  # in-flight calls get this long to finish on SIGTERM
    tls_cert: str = ""  # PEM certificate chain; with tls_key the API port speaks TLS only
    tls_key: str = ""  # PEM private key
    auth_tokens: str = ""  # JSON file of token digests, scopes and rate limits (serving/frontend/auth.py); "" = open
    limits: Limits = field(default=DEFAULT_LIMITS)
    chat_limits: ChatLimits = field(default=DEFAULT_CHAT_LIMITS)

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> FrontendConfig:
        parser = argparse.ArgumentParser(
            prog="python -m serving.frontend.server",
            description="OmniGen2 gRPC front end; every flag also reads OMNIGEN2_<FLAG> from the environment.",
        )
        defaults = cls()
        for f in fields(cls):
            if f.name in ("limits", "chat_limits"):
                continue
            default = getattr(defaults, f.name)
            kind = type(default)
            env = f"OMNIGEN2_{f.name.upper()}"
            if env in os.environ:
                default = kind(os.environ[env])
            parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=default, help=f"env {env}")
        args = parser.parse_args(argv)
        return cls(**vars(args))

"""Bearer-token authentication with per-token method scopes and rate limits (a server interceptor).

The tokens file holds only SHA-256 digests of the tokens, never the tokens:

    {"tokens": [{"name": "web-app", "sha256": "<hex digest of the token>", "rate_per_minute": 120, "burst": 10,
                 "methods": ["Generate", "GenerateStream", "GetModelInfo"]}]}

`methods` absent: every method. Health checking and reflection stay open (load balancers and tools call them).
Missing or unknown token: UNAUTHENTICATED; a method outside the token's scope: PERMISSION_DENIED; over the rate:
RESOURCE_EXHAUSTED with RetryInfo saying when the next call is allowed.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from serving.frontend.health import SERVICE
from serving.frontend.reading import unread_refusal
from serving.frontend.status import ApiError, plain, resource_exhausted

PROTECTED_PREFIX = f"/{SERVICE}/"


@dataclass
class TokenBucket:
    rate_per_s: float
    capacity: float
    level: float = field(init=False)
    stamp: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.level = self.capacity

    def take(self) -> float:
        """0 when a call may go now (and counts it), else the seconds until one may."""
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate_per_s)
        self.stamp = now
        if self.level >= 1.0:
            self.level -= 1.0
            return 0.0
        return (1.0 - self.level) / self.rate_per_s


@dataclass
class TokenPolicy:
    name: str
    methods: frozenset[str] | None
    bucket: TokenBucket


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenRegistry:
    def __init__(self, policies: dict[str, TokenPolicy]) -> None:
        self.policies = policies  # by token digest

    @classmethod
    def from_file(cls, path: Path) -> TokenRegistry:
        entries = json.loads(path.read_text())["tokens"]
        policies = {}
        for entry in entries:
            rate = float(entry.get("rate_per_minute", 60)) / 60.0
            methods = entry.get("methods")
            policies[entry["sha256"].lower()] = TokenPolicy(
                name=entry["name"],
                methods=frozenset(methods) if methods is not None else None,
                bucket=TokenBucket(rate, float(entry.get("burst", 1))),
            )
        return cls(policies)

    def identify(self, metadata: Sequence[tuple[str, Any]] | None) -> TokenPolicy | None:
        for key, value in metadata or ():
            if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
                return self.policies.get(token_digest(value.removeprefix("Bearer ").strip()))
        return None

    def check(self, method: str, metadata: Sequence[tuple[str, Any]] | None) -> None:
        """Raise the ApiError that refuses this call, if any."""
        if not method.startswith(PROTECTED_PREFIX):
            return
        policy = self.identify(metadata)
        if policy is None:
            raise plain(grpc.StatusCode.UNAUTHENTICATED, "a valid bearer token is required (authorization metadata)")
        name = method.removeprefix(PROTECTED_PREFIX)
        if policy.methods is not None and name not in policy.methods:
            raise plain(grpc.StatusCode.PERMISSION_DENIED, f"token {policy.name!r} may not call {name}")
        wait = policy.bucket.take()
        if wait > 0:
            raise resource_exhausted(f"token {policy.name!r} is over its rate limit", wait)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, registry: TokenRegistry, on_denied: Callable[[str, grpc.StatusCode], None]) -> None:
        self.registry = registry
        self.on_denied = on_denied

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        try:
            self.registry.check(method, handler_call_details.invocation_metadata)
        except ApiError as exc:
            self.on_denied(method, exc.code)
            return unread_refusal(handler, exc.status)  # a refused upload is not read
        return handler

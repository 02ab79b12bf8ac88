"""Bearer-token authentication with per-token method scopes and rate limits (a server interceptor).

The tokens file holds only SHA-256 digests of the tokens, never the tokens:

    {"tokens": [{"name": "web-app", "sha256": "<hex digest of the token>", "rate_per_minute": 120, "burst": 10,
                 "methods": ["Generate", "GenerateStream", "GetModelInfo"]}]}

`methods` absent: every method; present, the service's method names as the proto spells them. Health checking and
reflection stay open (load balancers and tools call them).
Missing or unknown token: UNAUTHENTICATED; a method outside the token's scope: PERMISSION_DENIED; over the rate:
RESOURCE_EXHAUSTED with RetryInfo saying when the next call is allowed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import stat
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor_pool

from serving.errors import SettingError
from serving.frontend.health import SERVICE
from serving.frontend.reading import unread_refusal
from serving.frontend.status import ApiError, plain, resource_exhausted

PROTECTED_PREFIX = f"/{SERVICE}/"
METHODS = frozenset(method.name for method in descriptor_pool.Default().FindServiceByName(SERVICE).methods)


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


def _policy(entry: object, where: str) -> TokenPolicy:
    if not isinstance(entry, dict):
        raise SettingError("--auth-tokens", f"{where}: an object with `name` and `sha256`")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise SettingError("--auth-tokens", f"{where}.name: a non-empty string")
    where = f"{where} ({name!r})"
    digest = entry.get("sha256")
    if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdefABCDEF" for c in digest):
        raise SettingError("--auth-tokens", f"{where}.sha256: the 64 hex digits of the token's SHA-256")
    rate = _positive(entry.get("rate_per_minute", 60), f"{where}.rate_per_minute")
    burst = _positive(entry.get("burst", 1), f"{where}.burst")
    if burst < 1:
        raise SettingError("--auth-tokens", f"{where}.burst: at least 1 (a call takes one), got {burst}")
    methods = entry.get("methods")
    if methods is not None and (not isinstance(methods, list) or not all(isinstance(m, str) for m in methods)):
        raise SettingError("--auth-tokens", f'{where}.methods: a list of method names, e.g. ["Generate"]')
    unknown = sorted(set(methods or ()) - METHODS)
    if unknown:  # a typo would deny its method on every call, silently
        known = ", ".join(sorted(METHODS))
        raise SettingError("--auth-tokens", f"{where}.methods: no method {unknown[0]!r} (case-sensitive: {known})")
    return TokenPolicy(name, frozenset(methods) if methods is not None else None, TokenBucket(rate / 60.0, burst))


def _positive(value: object, where: str) -> float:
    """A finite number above 0: 0 would divide by zero, negative or NaN would mean no limit at all."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise SettingError("--auth-tokens", f"{where}: a finite number above 0, got {value!r}")
    return float(value)


class TokenRegistry:
    def __init__(self, policies: dict[str, TokenPolicy]) -> None:
        self.policies = policies  # by token digest

    @classmethod
    def from_file(cls, path: Path) -> TokenRegistry:
        """Every entry is checked here: a bad rate or scope would otherwise show only on a call (a 500, no limit, or
        a token that may call nothing). A file anyone may write is refused (as ssh refuses such a key file): anyone
        could add a token to it; so is one with no token, which no call could pass."""
        try:
            mode = path.stat().st_mode
            entries = json.loads(path.read_text())["tokens"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SettingError("--auth-tokens", f"{path}: not a JSON object with a `tokens` list ({exc})") from None
        if mode & stat.S_IWOTH:
            raise SettingError("--auth-tokens", f"anyone may write it, and so add a token: chmod o-w ({path})")
        if not isinstance(entries, list):
            raise SettingError("--auth-tokens", f"{path}: `tokens` must be a list")
        if not entries:
            raise SettingError("--auth-tokens", f"no token: every call would be refused ({path})")
        policies = {}
        for index, entry in enumerate(entries):
            policy = _policy(entry, f"{path}: tokens[{index}]")
            policies[entry["sha256"].lower()] = policy
        return cls(policies)

    def identify(self, metadata: Sequence[tuple[str, Any]] | None) -> TokenPolicy | None:
        for key, value in metadata or ():
            if key == "authorization" and isinstance(value, str):
                scheme, _, token = value.partition(" ")
                if scheme.lower() == "bearer":  # auth schemes are case-insensitive (RFC 7235)
                    return self.policies.get(token_digest(token.strip()))
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
    def __init__(
        self, registry: TokenRegistry, on_denied: Callable[[str, grpc.StatusCode, str, float, str], None]
    ) -> None:
        """`on_denied(method, status, peer, seconds, request_id)` records a refused call, as the read gate's
        `on_ended` does."""
        self.registry = registry
        self.on_denied = on_denied

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:  # no such method: grpcio answers UNIMPLEMENTED, with a token or without
            return None
        method: str = handler_call_details.method
        try:
            self.registry.check(method, handler_call_details.invocation_metadata)
        except ApiError as exc:
            # Recorded by the refusal's handler: only there is the caller's peer known.
            recorded = functools.partial(self.on_denied, method, exc.code)
            return unread_refusal(handler, exc.status, recorded)  # a refused upload is not read
        return handler

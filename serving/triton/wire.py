"""Error messages on the `omnigen2` stream. Triton's stream responses carry only a message, not a status code,
so the BLS prefixes the code, and callers (the front end, tests) parse it back."""

from __future__ import annotations

from dataclasses import dataclass

CODES = ("INVALID_ARGUMENT", "CANCELLED", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "INTERNAL")
# Request parameters: a request's random key, and a stop request naming it (serving/triton/stops.py).
CALL_PARAMETER = "omnigen2_call"
STOP_PARAMETER = "omnigen2_stop"
# gRPC channel options for Triton's callers. Triton runs beside them (loopback, or the pod's other container), so a
# connection lost or not yet there is tried again every half second at most, not after gRPC's default backoff,
# which grows to two minutes: the front end is back within a second of a restarted Triton, and a starting server
# is seen ready when it is.
# (Not grpc.min_reconnect_backoff_ms: it is the time a connection attempt is allowed, 20 s by default.)
RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 500)]


@dataclass(frozen=True)
class WireError:
    code: str
    message: str
    field: str | None = None

    def __str__(self) -> str:
        detail = f"{self.field}: {self.message}" if self.field else self.message
        return f"{self.code}: {detail}"

    @classmethod
    def parse(cls, text: str) -> WireError:
        """Inverse of str(); a message without a known code prefix is INTERNAL."""
        code, sep, rest = text.partition(": ")
        if not sep or code not in CODES:
            return cls("INTERNAL", text)
        if code == "INVALID_ARGUMENT":
            field, sep, message = rest.partition(": ")
            if sep:
                return cls(code, message, field)
        return cls(code, rest)

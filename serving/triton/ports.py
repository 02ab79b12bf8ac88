"""Loopback ports for Triton and the front end: free ones, whether one is taken, and Triton's three checked free."""

from __future__ import annotations

import contextlib
import errno
import socket
from dataclasses import dataclass

from serving.errors import SettingError
from serving.triton import leftovers

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def port_in_use(port: int, host: str = LOOPBACK) -> bool:
    """Whether a server listens on `host:port` (one in TIME_WAIT is free: servers reuse those). An address this
    machine cannot bind for another reason (not one of its own) is not in use: `bind_error` says why."""
    error = bind_error(port, host)
    return isinstance(error, OSError) and error.errno == errno.EADDRINUSE


def bind_error(port: int, host: str = LOOPBACK) -> OSError | None:
    """Why a server could not listen on `host:port` here (in use, a host not this machine's or not found), or None;
    bound and let go at once, as a server would bind it (SO_REUSEADDR: a port in TIME_WAIT is free)."""
    try:
        found = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return exc
    family, kind, proto, _, address = found[0]
    with contextlib.closing(socket.socket(family, kind, proto)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            return exc
        return None


@dataclass(frozen=True)
class Ports:
    http: int
    grpc: int
    metrics: int

    @classmethod
    def free(cls) -> Ports:
        return cls(free_port(), free_port(), free_port())

    def check_free(self) -> None:
        """Refuse ports another server listens on: it would answer the readiness checks (a second `make serve`
        would then use the first one's Triton, its models and checkpoint) while this one fails to bind. A Triton that
        a dead stack left on them is killed first (serving/triton/leftovers.py)."""
        taken = self._taken()
        if taken and leftovers.end_orphaned_server(leftovers.region_prefix(self.grpc)):
            taken = self._taken()
        if taken:
            raise SettingError(
                "--triton-ports",
                f"{', '.join(map(str, taken))} on {LOOPBACK} in use (another tritonserver?): choose three free ports, "
                "e.g. make serve SERVE_ARGS='--triton-ports 8100 8101 8102'",
            )

    def _taken(self) -> list[int]:
        return [port for port in (self.http, self.grpc, self.metrics) if port_in_use(port)]

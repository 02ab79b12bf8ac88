"""The front end's Prometheus endpoint: prometheus_client's WSGI app (its exposition, content negotiation, gzip) on a
threaded server of bounded size. prometheus_client's own start_http_server started a thread per connection and
never timed one out: 3000 connections sending a request without its final blank line held 3000 threads and files
for as long as they stayed, and the front end served its API slowly meanwhile (docs/reliability.md)."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, make_wsgi_app

log = logging.getLogger("omnigen2.frontend")


class _QuietHandler(WSGIRequestHandler):
    """No line per scrape (prometheus_client's handler logs none either)."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


class MetricsServer(ThreadingMixIn, WSGIServer):
    """Serves `registry` on (address, port) from a thread of its own: at most `max_connections` connections at once
    (each on a thread; one past it is closed unread, the kernel's backlog holding the rest), each closed
    `timeout_s` after it was accepted whatever it sends meanwhile, a request dripped a byte at a time included."""

    daemon_threads = True  # a scrape in progress does not hold up the process's exit
    block_on_close = False
    request_queue_size = 128  # socketserver's 5 would leave a burst of scrapes waiting on SYN retries

    def __init__(
        self, registry: CollectorRegistry, address: str, port: int, max_connections: int, timeout_s: float
    ) -> None:
        # IPv4 or IPv6, as the address is (prometheus_client's start_http_server chooses so too); "" is every
        # address, as the stack's check of the port (serving/triton/ports.py bind_error) takes it.
        found = socket.getaddrinfo(address or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        self.address_family = found[0]
        super().__init__((str(found[4][0]), port), _QuietHandler)
        self.set_app(make_wsgi_app(registry))
        self.timeout_s = timeout_s
        self.slots = threading.BoundedSemaphore(max_connections)
        self.deadlines: dict[socket.socket, float] = {}
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.serve_forever, name="metrics", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        """Stops accepting (waits for the serving loop, at most its 0.5 s poll) and closes the listening socket."""
        self.shutdown()
        self.server_close()

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        request.settimeout(self.timeout_s)  # each read and write; the deadline below bounds the whole connection
        with self.lock:
            self.deadlines[request] = time.monotonic() + self.timeout_s
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started: its slot is back here
            self._ended(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._ended(request)

    def _ended(self, request: socket.socket) -> None:
        with self.lock:
            self.deadlines.pop(request, None)
        self.slots.release()

    def service_actions(self) -> None:
        """Between accepts (every 0.5 s at most): connections past their deadline are shut down, which ends the
        read or write their thread waits in."""
        now = time.monotonic()
        with self.lock:
            late = [request for request, deadline in self.deadlines.items() if deadline <= now]
        for request in late:
            with contextlib.suppress(OSError):  # closed meanwhile by its thread
                request.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that timed out or was cut: socketserver's default prints a traceback to stderr."""
        log.debug("metrics connection from %s ended early", client_address, exc_info=True)


def serve_metrics(
    registry: CollectorRegistry, address: str, port: int, max_connections: int, timeout_s: float
) -> MetricsServer:
    """The endpoint, listening and serving; OSError when the address cannot be bound."""
    server = MetricsServer(registry, address, port, max_connections, timeout_s)
    server.start()
    return server

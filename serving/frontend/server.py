"""Run the OmniGen2 gRPC front end: `python -m serving.frontend.server --help`.

It serves the OmniGen2 API, gRPC health checking (SERVING while Triton and its models are ready, once warmed up) and
server reflection on one port, and Prometheus metrics on another; SIGTERM drains in-flight calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from omnigen2.v1 import omnigen2_pb2_grpc as pb_grpc

from serving.errors import OmniGen2Error, SettingError
from serving.frontend import access_log, socket_dir
from serving.frontend.auth import METHODS, PROTECTED_PREFIX, AuthInterceptor, TokenRegistry
from serving.frontend.config import FrontendConfig
from serving.frontend.health import SERVICE, TritonHealth
from serving.frontend.loopback import is_loopback
from serving.frontend.malformed import MalformedRequestInterceptor
from serving.frontend.metrics import Metrics
from serving.frontend.metrics_server import MetricsServer, serve_metrics
from serving.frontend.openai_http import OpenAIGateway
from serving.frontend.policy import PolicyFile, PromptPolicy
from serving.frontend.reading import ReadGate
from serving.frontend.service import OmniGen2Service
from serving.frontend.tls_files import read_tls
from serving.frontend.triton_backend import TritonBackend
from serving.frontend.warmup import Warmup, warmup_requests
from serving.log_format import configure as configure_logging

log = logging.getLogger("omnigen2.frontend")
# Half the smallest keepalive time Go's and Java's clients allow (10 s): a client set to it, whose pings gRPC
# jitters or sends a little early, is not taken for one pinging too often.
MIN_CLIENT_PING_INTERVAL_MS = 5_000
# How long past --stop-grace-s the stop waits for cut calls' handlers to end (they record themselves last).
ENDING_MARGIN_S = 5.0
NAMED_CUTS = 20  # request ids the drain's warning names; the count says how many more


class Frontend:
    """The gRPC server and what it owns; start() binds, stop() drains and closes."""

    def __init__(self, config: FrontendConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        self.backend = TritonBackend(
            config.triton_url,
            config.max_response_bytes,
            config.retry_after_s,
            config.stop_grace_s,
            self.metrics.stop_grace_expired.inc,
        )
        warm_up = Warmup(config, self.backend, self.metrics).run if config.warmup else None
        self.health = TritonHealth(self.backend, config.health_interval_s, warm_up)
        self.tokens = TokenRegistry.from_file(Path(config.auth_tokens)) if config.auth_tokens else None
        self.policy = PolicyFile(Path(config.policy)) if config.policy else None
        self.service = OmniGen2Service(config, self.backend, self.metrics, self.tokens, self.policy)
        # The read gate comes first: it sees the handler the others chose (an unread refusal of theirs passes it).
        uploads = frozenset(f"/{SERVICE}/{name}" for name in ("Generate", "GenerateStream", "Understand"))
        gate = ReadGate(
            uploads,
            config.held_request_budget(),
            2 * config.max_request_bytes,
            config.request_read_timeout_s,
            config.retry_after_s,
            self.metrics,
            self._denied,
            executor=self.service.readers,  # large requests are parsed there
            cut_at=lambda: self.service.cut_at,
            running=self.service.running,  # a call cut while its request arrives is waited for by the stop
        )
        for name, pool in gate.pools.items():
            self.metrics.max_held_request_bytes.labels(name).set(pool.budget)
        interceptors: list[grpc.aio.ServerInterceptor] = [gate, MalformedRequestInterceptor(f"/{SERVICE}/")]
        if self.tokens:
            interceptors.append(AuthInterceptor(self.tokens, self._denied))
        self.server = grpc.aio.server(interceptors=interceptors, options=_server_options(config))
        pb_grpc.add_OmniGen2Servicer_to_server(self.service, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, self.server)
        reflection.enable_server_reflection([SERVICE, "grpc.health.v1.Health", reflection.SERVICE_NAME], self.server)
        self.port = 0
        self.http_port = 0
        self.metrics_server: MetricsServer | None = None
        self._watch: asyncio.Task[None] | None = None
        # The OpenAI-compatible HTTP API calls this server over a Unix socket in a folder only this user can open.
        self.gateway: OpenAIGateway | None = None
        self._socket_dir = ""
        if config.http_listen:
            self._socket_dir = str(socket_dir.create())  # a killed front end's is removed first
            self.gateway = OpenAIGateway(config, f"unix:{self._socket_dir}/grpc.sock", self.metrics, self.tokens)

    def reload_policy(self) -> None:
        """SIGHUP: re-read the policy file; one that does not load leaves the policy as it was."""
        if self.policy is None:
            log.warning("SIGHUP: no --policy file to reload")
            return
        self.metrics.policy_reloads.labels("ok" if self.policy.reload() else "failed").inc()

    def _denied(self, method: str, code: grpc.StatusCode, peer: str, seconds: float, call_id: str) -> None:
        """A call ended before its handler ran (refused by an interceptor, or ended at the read gate)."""
        # Label values only from the service's methods: one per caller-chosen path would grow /metrics unbounded.
        name = method.removeprefix(PROTECTED_PREFIX)
        if not method.startswith(PROTECTED_PREFIX) or name not in METHODS:
            name = "unknown"
        self.metrics.requests.labels(name, code.name).inc()
        if code is grpc.StatusCode.UNAVAILABLE:  # the read gate's cut by the stop: no interceptor refuses with it
            self.service.record_cut(name, call_id)
        access_log.record(name, peer, "-", code.name, seconds, request_id=call_id)

    async def start(self) -> int:
        try:
            return await self._start()
        except BaseException:
            shutil.rmtree(self._socket_dir, ignore_errors=True)  # stop() is not called for one that did not start
            raise

    async def _start(self) -> int:
        config = self.config
        tls = read_tls(config.tls_cert, config.tls_key)  # a bad file named by its flag, not taken for a bind failure
        try:
            if tls is not None:
                cert, key = tls
                self.port = self.server.add_secure_port(config.listen, grpc.ssl_server_credentials([(key, cert)]))
            else:
                self.port = self.server.add_insecure_port(config.listen)
        except RuntimeError:  # grpcio raises when the bind fails (older versions returned 0)
            self.port = 0
        if self.port == 0:
            raise SettingError("--listen", f"cannot listen on {config.listen}: the port is in use or the host not ours")
        if self.gateway is not None and self.server.add_insecure_port(self.gateway.target) == 0:
            raise OSError(f"cannot listen on {self.gateway.target}")
        self.service.server_id = config.server_id or f"{socket.gethostname()}:{self.port}"
        if not is_loopback(config.listen.rpartition(":")[0]):
            if not config.tls_cert:
                log.warning("the API listens on %s without TLS: set --tls-cert and --tls-key", config.listen)
            if not self.tokens:
                log.warning("the API listens on %s without --auth-tokens: every caller is served", config.listen)
        if config.metrics_port:
            where = f"{config.metrics_address}:{config.metrics_port}"
            try:
                self.metrics_server = serve_metrics(
                    self.metrics.registry,
                    config.metrics_address,
                    config.metrics_port,
                    config.metrics_max_connections,
                    config.metrics_timeout_s,
                )
            except OSError as exc:
                raise SettingError("--metrics-port", f"cannot serve metrics on {where}: {exc.strerror}") from None
            if not is_loopback(config.metrics_address):
                log.warning(
                    "the metrics listen on %s, without TLS or tokens: limit who can reach it (a NetworkPolicy)", where
                )
        await self.health.refresh()
        self._watch = asyncio.create_task(self.health.watch())
        await self.server.start()
        if self.gateway is not None:
            try:
                self.http_port = await self.gateway.start(config.http_listen)
            except OSError as exc:
                await self.stop()  # the gRPC server is up already
                raise SettingError("--http-listen", f"cannot listen on {config.http_listen}: {exc.strerror}") from None
            if not is_loopback(config.http_listen.rpartition(":")[0]):
                if not config.tls_cert:
                    log.warning(
                        "the HTTP API listens on %s without TLS: set --tls-cert and --tls-key", config.http_listen
                    )
                if not self.tokens:
                    log.warning(
                        "the HTTP API listens on %s without --auth-tokens: every caller is served, but one that "
                        "reaches it on loopback must name a loopback Host (DNS rebinding; a proxy there passing on "
                        "its callers' Host: list their origins in --http-allowed-origins)",
                        config.http_listen,
                    )
        return self.port

    async def stop(self) -> int:
        """Health turns NOT_SERVING, new calls are refused, in-flight calls get the grace period to finish; then the
        calls it cut end (their models stopped, each recorded). Returns how many handlers were still running after
        that wait (0 unless one is stuck)."""
        await self.health.shutdown()
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        # HTTP requests in flight are calls in flight: both drain together, within the grace period, and a warm-up
        # in progress stops meanwhile.
        gateway = self.gateway.stop() if self.gateway is not None else asyncio.sleep(0)
        self.service.cut_at = time.monotonic() + self.config.shutdown_grace_s
        await asyncio.gather(gateway, self.server.stop(self.config.shutdown_grace_s), self.health.wait_closed())
        # gRPC's stop returns once it has cancelled the calls past the grace, not once their handlers have ended: a
        # cut call waits for its model to confirm the stop (up to --stop-grace-s), with the backend still open.
        running = await self.service.ended(self.config.stop_grace_s + ENDING_MARGIN_S)
        await self.backend.close()
        if self._socket_dir:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
        # Off the event loop: closing joins the trimmer's thread (up to 1 s, a trim in progress), and an embedded
        # front end's loop may be serving other work meanwhile.
        await asyncio.to_thread(self.service.close)
        if self.metrics_server is not None:  # last: Triton's preStop (deploy/k8s) waits for this port to close
            await asyncio.to_thread(self.metrics_server.close)
        return running

    async def drain(self) -> None:
        """SIGTERM's stop, logged: the calls the grace period cut (a warning naming their request ids), then the
        stop's end."""
        log.info("draining in-flight calls (up to %g s)", self.config.shutdown_grace_s)
        running = await self.stop()
        cut = self.service.cut_by_drain
        if cut:
            more = len(cut) - NAMED_CUTS
            named = ", ".join(cut[:NAMED_CUTS]) + (f" and {more} more" if more > 0 else "")
            log.warning(
                "the drain's grace period (%g s) cut %d call(s) (UNAVAILABLE); request ids: %s",
                self.config.shutdown_grace_s,
                len(cut),
                named,
            )
        if running:
            waited = self.config.stop_grace_s + ENDING_MARGIN_S
            # Every handler still running: cut calls, and calls that ended early (cancelled) before the cut, both
            # waiting on their model's stop.
            log.warning(
                "front end stopped: %d call(s) still waiting on their model's stop %g s after the cut", running, waited
            )
        else:
            log.info("front end stopped: no call in flight (%d cut by the drain)", len(cut))


def _server_options(config: FrontendConfig) -> list[tuple[str, int]]:
    """The gRPC server's options: the bounds FrontendConfig sets, and the gRPC defaults this server changes."""
    return [
        # Up to twice the limit a request is read, then refused naming its largest field; beyond, the
        # transport refuses it unread (RESOURCE_EXHAUSTED).
        ("grpc.max_receive_message_length", 2 * config.max_request_bytes),
        # Identity-encoded messages only: gRPC inflates a compressed one whole before that cap refuses it
        # (1 MB of gzip became 1 GiB held). Others end UNIMPLEMENTED "Compression algorithm ... disabled".
        ("grpc.compression_enabled_algorithms_bitset", 1 << grpc.Compression.NoCompression.value),
        ("grpc.max_send_message_length", config.max_response_bytes),
        ("grpc.max_connection_idle_ms", int(config.grpc_idle_timeout_s * 1000)),
        # A caller that answers no ping is cut off with its connection, and gRPC frees what it had queued
        # for it (a cut-off reply included). Pings go on while nothing else is sent (a call whose reply
        # waits on a full window, a long generation), and with no call open: the idle timeout above
        # closes such a connection too, but one whose peer is gone sooner.
        ("grpc.keepalive_time_ms", round(config.grpc_keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", round(config.grpc_keepalive_timeout_s * 1000)),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        # gRPC 1.81 times a keepalive ping out at this (60 s by default), not at keepalive_timeout_ms; it
        # also times out the flow-control (BDP) pings a caller leaves unanswered.
        ("grpc.http2.ping_timeout_ms", round(config.grpc_keepalive_timeout_s * 1000)),
        # Clients' own keepalive pings are taken down to one every MIN_CLIENT_PING_INTERVAL_MS, with or
        # without calls; gRPC's default refused one more often than every 5 min (2 h with no call), closing
        # the connection of a client that pinged every minute. A ping sooner than that while the server
        # sends nothing is a strike; the third in a row (past max_ping_strikes) is GOAWAY too_many_pings.
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_CLIENT_PING_INTERVAL_MS),
        ("grpc.http2.max_ping_strikes", 2),  # gRPC's default, named: the interval above is sized for it
        # A TLS handshake not done by then is closed (gRPC's default: 120 s); the HTTPS port's is bounded too.
        ("grpc.server_handshake_timeout_ms", max(1, round(config.tls_handshake_timeout_s * 1000))),
        # A port another server holds is refused: gRPC's default would share it, splitting the callers.
        ("grpc.so_reuseport", 0),
        *_connection_age(config),
    ]


def _connection_age(config: FrontendConfig) -> list[tuple[str, int]]:
    """--grpc-max-connection-age-s, when on: gRPC's default age is unbounded, its default grace too."""
    if not config.grpc_max_connection_age_s:
        return []
    return [
        ("grpc.max_connection_age_ms", round(config.grpc_max_connection_age_s * 1000)),
        ("grpc.max_connection_age_grace_ms", round(config.grpc_max_connection_age_grace_s * 1000)),
    ]


async def serve(
    config: FrontendConfig,
    ready: Callable[[], None] | None = None,
    serving: Callable[[], None] | None = None,
    stopping: Callable[[], None] | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT; `ready` is called once every port is bound, `serving` the first time health
    says SERVING (Triton ready and warmed up), if before the stop, and `stopping` when the stop begins, to install
    the caller's own SIGTERM/SIGINT handlers for the rest (the event loop's are taken off first)."""
    frontend = Frontend(config)
    port = await frontend.start()
    host = config.listen.rpartition(":")[0]
    metrics = (
        f", metrics on http://{config.metrics_address}:{config.metrics_port}/metrics" if config.metrics_port else ""
    )
    log.info("OmniGen2 API on %s:%d (Triton at %s)%s", host, port, config.triton_url, metrics)
    if frontend.gateway is not None:
        http_host = config.http_listen.rpartition(":")[0]
        log.info("OpenAI-compatible HTTP API on http://%s:%d/v1", http_host, frontend.http_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, frontend.reload_policy)
    if ready is not None:
        ready()
    announce = asyncio.create_task(_when_served(frontend.health, serving)) if serving is not None else None
    await stop.wait()
    if stopping is not None:
        # Else closing the loop would put back Python's defaults: a SIGTERM while asyncio.run winds down (its executor
        # threads) would exit 143, before the caller (serving.stack) had stopped Triton.
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        stopping()
    if announce is not None:
        announce.cancel()
    await frontend.drain()


async def _when_served(health: TritonHealth, call: Callable[[], None]) -> None:
    await health.served.wait()
    call()


def check_settings(config: FrontendConfig) -> None:
    """Check what the start checks beyond the flags' values, as it would: the files the flags name (TLS, tokens,
    policy) and the warm-up's requests. `make serve` calls it before its model build, not after Triton's start."""
    read_tls(config.tls_cert, config.tls_key)
    if config.auth_tokens:
        TokenRegistry.from_file(Path(config.auth_tokens))
    if config.policy:
        PromptPolicy.from_file(Path(config.policy))
    if config.warmup:
        warmup_requests(config)


def main(argv: list[str] | None = None) -> None:
    configure_logging()
    try:
        asyncio.run(serve(FrontendConfig.from_args(argv)))
    except OmniGen2Error as exc:  # a setting to fix (a port in use, ...): one line, not a traceback
        sys.exit(f"serving.frontend: {exc}")


if __name__ == "__main__":
    main()

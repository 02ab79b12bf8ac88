"""Front-end settings: command-line flags, each with an OMNIGEN2_* environment variable as its default."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields

from serving.cli_help import HelpFormatter
from serving.errors import SettingError
from serving.flag_types import Address, Number, Origins, Whole, check_value, from_env
from serving.frontend.flag_help import FLAG_HELP
from serving.pipeline.chat_request import DEFAULT_CHAT_LIMITS, ChatLimits
from serving.pipeline.images import SIZE_MULTIPLE
from serving.pipeline.request import DEFAULT_LIMITS, Limits, limits_from_json

MiB = 1024 * 1024
MAX_GRPC_MS = 2**31 - 1  # gRPC's channel arguments are C ints
MAX_GRPC_S = MAX_GRPC_MS // 1000  # seconds that gRPC takes in whole ms
_SECONDS = Number(0, above=True)
_COUNT = Whole(1)
# What each flag takes (argparse's `type=`); checked before anything is loaded, and on its OMNIGEN2_* variable.
FLAG_TYPES: dict[str, Whole | Number | Address | Origins] = {
    "listen": Address(),
    "triton_url": Address(),
    "http_listen": Address(optional=True),
    "metrics_port": Whole(0, 65_535, "0: off"),
    "metrics_max_connections": _COUNT,
    "metrics_timeout_s": _SECONDS,
    "max_in_flight": _COUNT,
    "retry_after_s": Number(0, why="0: a full read gate refuses at once"),
    "max_request_bytes": Whole(1, MAX_GRPC_MS // 2, "gRPC reads up to 2 x this in a C int"),
    "max_held_request_bytes": Whole(0, why="0: from --max-in-flight"),
    "request_read_timeout_s": _SECONDS,
    "grpc_idle_timeout_s": Number(0, MAX_GRPC_S, above=True, why="gRPC takes whole ms in a C int"),
    "grpc_keepalive_time_s": Number(1, MAX_GRPC_S, why="gRPC takes whole ms in a C int"),
    "grpc_keepalive_timeout_s": Number(1, MAX_GRPC_S, why="gRPC takes whole ms in a C int"),
    "grpc_max_connection_age_s": Number(1, MAX_GRPC_S, off=True, why="0: off"),
    "grpc_max_connection_age_grace_s": Number(0, MAX_GRPC_S, why="gRPC takes whole ms in a C int"),
    "max_response_bytes": Whole(1, MAX_GRPC_MS, "gRPC's largest message"),
    "health_interval_s": _SECONDS,
    # The least input image: the API leaves it to the BLS, which would refuse the warm-up's edit.
    "warmup_size": Whole(SIZE_MULTIPLE),
    "warmup_steps": _COUNT,
    "warmup_timeout_s": _SECONDS,
    "shutdown_grace_s": Number(0, why="0: cut calls at once"),
    "max_request_input_pixels": _COUNT,
    "max_inflight_input_pixels": _COUNT,
    "max_sample_tokens": _COUNT,
    "max_step_tokens": _COUNT,
    "max_inflight_step_tokens": _COUNT,
    "max_request_tokens": _COUNT,
    "max_inflight_output_pixels": _COUNT,
    "max_run_s": _SECONDS,
    "max_chat_tokens": _COUNT,
    "max_inflight_chat_tokens": _COUNT,
    "worker_threads": _COUNT,
    "stream_write_timeout_s": _SECONDS,
    "stream_min_write_rate": _COUNT,
    "http_body_timeout_s": _SECONDS,
    "http_min_body_rate": _COUNT,
    "http_idle_timeout_s": _SECONDS,
    "http_max_connections": Whole(0, why="0: half the open-file limit"),
    "http_allowed_origins": Origins(),
    "max_buffered_stream_bytes": _COUNT,
    "stop_grace_s": Number(0, why="0: cancel at once"),
    "tls_handshake_timeout_s": Number(0.001, MAX_GRPC_S, why="gRPC takes whole ms in a C int"),
}


@dataclass(frozen=True)
class FrontendConfig:
    listen: str = "127.0.0.1:50051"  # loopback unless the operator opens it on purpose
    triton_url: str = "127.0.0.1:8001"
    http_listen: str = ""  # the OpenAI-compatible HTTP API (serving/frontend/openai_http.py); "" = off
    metrics_address: str = "127.0.0.1"
    metrics_port: int = 9464  # Prometheus text format on http://metrics_address:metrics_port/metrics; 0 = off
    # Connections to the metrics port served at once (a thread each), past it closed unread; each is closed this
    # long after it was accepted: silent ones otherwise held a thread and a file each for ever
    # (serving/frontend/metrics_server.py). A scrape takes milliseconds; Prometheus opens one at a time.
    metrics_max_connections: int = 8
    metrics_timeout_s: float = 10.0
    max_in_flight: int = 16  # admitted Generate + Understand calls at once; beyond: RESOURCE_EXHAUSTED
    retry_after_s: float = 1.0  # the RetryInfo delay sent with RESOURCE_EXHAUSTED
    max_request_bytes: int = 64 * MiB  # larger requests: INVALID_ARGUMENT naming the largest field
    # gRPC request bytes held at once (serving/frontend/reading.py): a request reserves 2 x max_request_bytes before
    # it is read, then its size until its call ends; one that does not fit waits up to retry_after_s for room, then
    # is refused unread (RESOURCE_EXHAUSTED).
    # Generate, GenerateStream and Understand share this much; the other unary calls (GetModelInfo) have their own
    # budget of 4 of the largest requests (or this much if less) and 5 s to send theirs; health is not gated. A read
    # peaks at about 4.5x its bytes (gRPC's copy, the parsed message, the size check). 0: max_in_flight + 1 reads of
    # the largest request at once (2176 MiB at the defaults), so that slow uploads are never refused below the count
    # that admission allows, even beside calls still ending (their requests held); lower it to bound memory below
    # that (see held_request_budget).
    max_held_request_bytes: int = 0
    # A gRPC call whose request message has not all arrived this long after the call opened ends DEADLINE_EXCEEDED:
    # a caller that opens calls and sends nothing would otherwise hold their reservations for ever. 120 s: the
    # largest request (2 x max_request_bytes) at 9 Mbit/s, a 10 MB one at 0.7 Mbit/s.
    request_read_timeout_s: float = 120.0
    # A gRPC connection with no call in progress is closed after this long (GOAWAY; a client reconnects at its next
    # call): gRPC's own default kept one for ever.
    grpc_idle_timeout_s: float = 75.0
    # A gRPC connection from which nothing has come this long is pinged (HTTP/2 PING), with or without calls, and
    # closed if the ping is not answered within grpc_keepalive_timeout_s: a caller that stopped reading (frozen,
    # its network gone) otherwise kept it, and the replies gRPC had queued for it, for ever (a frozen process's
    # kernel still answers TCP). A live client's transport answers pings whatever its application does, a call
    # silent for minutes (a long generation) included. 60 s: under the 350 s to 15 min after which cloud NATs and
    # load balancers drop a silent connection, and one ping a minute per idle connection costs nothing.
    grpc_keepalive_time_s: float = 60.0
    grpc_keepalive_timeout_s: float = 20.0  # gRPC's own default: room for a loaded peer or a slow path
    # A gRPC connection older than this is sent GOAWAY (its client reconnects at its next call), and closed with
    # the calls still open on it grpc_max_connection_age_grace_s later: a caller that answers pings but never takes
    # its reply otherwise kept the reply queued in gRPC as long as it stayed. 0 = off: a call running past the
    # grace (a generation takes up to max_run_s, its reply then stream_write_timeout_s and more) would be cut.
    grpc_max_connection_age_s: float = 0.0
    grpc_max_connection_age_grace_s: float = 900.0  # max_run_s + a slow reader's time at the defaults
    max_response_bytes: int = 512 * MiB
    health_interval_s: float = 1.0  # how often Triton's readiness is polled for the health service
    # Each time Triton turns ready, a text-to-image, an edit and an Understand call of this size and these steps
    # run before health says SERVING (serving/frontend/warmup.py): the first callers do not pay the first-call
    # cost. Past the time limit, or failed, health turns SERVING anyway. --no-warmup (env 0): SERVING at once.
    warmup: bool = True
    warmup_size: int = 16  # px, width and height; 16: the smallest input image the pipeline takes
    warmup_steps: int = 2
    warmup_timeout_s: float = 120.0
    shutdown_grace_s: float = 30.0  # in-flight calls get this long to finish on SIGTERM
    # The name this replica answers with in every call's initial metadata (x-served-by), so a client that balances
    # over several replicas knows which one served a call; "" = <hostname>:<port> (a pod's hostname is its name).
    server_id: str = ""
    tls_cert: str = ""  # PEM certificate chain; with tls_key the API port speaks TLS only
    tls_key: str = ""  # PEM private key
    # A connection to the gRPC or HTTPS port whose TLS handshake has not ended this long after it was accepted is
    # closed: gRPC's own default waited 120 s and asyncio's 60 s, and handshakes in progress are not yet counted
    # among the HTTP connections (--http-max-connections): 230 silent connections a second held 14 685 files.
    tls_handshake_timeout_s: float = 10.0
    auth_tokens: str = ""  # JSON file of token digests, scopes and rate limits (serving/frontend/auth.py); "" = open
    policy: str = ""  # prompt policy file, JSON or YAML (serving/frontend/policy.py), re-read on SIGHUP; "" = none
    # Budgets (serving/frontend/budgets.py, reported in GetModelInfo). The token defaults keep the default stack
    # inside a 24 GB machine: attention memory grows with the square of a sample's tokens (the measurements behind
    # them are in docs/reliability.md, admission by cost).
    max_request_input_pixels: int = 64_000_000  # decoded pixels of one request's input images
    max_inflight_input_pixels: int = 128_000_000  # the same, summed over the admitted requests
    # One sample: text + references + image tokens. 17 408 = 16 384 image tokens (three 1024x1024 references and
    # a 1024x1024 output, or one 2048x2048 image) + 1024 of text (max_sequence_length); such a sample takes the
    # transformer about 10 GB above idle (35 bytes x n^2, measured), and the BLS's call cap (the same number)
    # keeps a call from holding more than one of them.
    max_sample_tokens: int = 17_408
    max_step_tokens: int = 52_224  # one request's step: samples x CFG branches x tokens (three at the sample budget)
    max_inflight_step_tokens: int = 65_536  # the same, summed over the admitted generations (their step time)
    max_request_tokens: int = 2_500_000  # one request's tokens over all its steps (about its compute time)
    # Output pixels (n x width x height) summed over the admitted generations: a request's decoded frames, resizes,
    # encodes, Triton's output tensors and the response message (a unary one until it is handed to gRPC) took the
    # stack 36 bytes per output pixel at once, 65 summing each process's own peak (8 x 4096x4096 at 1 step,
    # docs/reliability.md), however few tokens made them. 150 M: the largest request the limits allow (134 M) fits
    # alone, 9.8 GB at 65 bytes beside the token budgets' worst case inside 24 GB. One request over it is refused
    # (INVALID_ARGUMENT).
    max_inflight_output_pixels: int = 150_000_000
    max_run_s: float = 600.0  # a generation running longer ends with DEADLINE_EXCEEDED
    # Understand: prompt (bounded as in serving/pipeline/cost.py) + max_new_tokens. 10 240 is what the request
    # limits allow (8192 prompt tokens + 2048 new); the `mllm` model answers one call at a time, so the in-flight
    # sum bounds the queue's wait rather than memory.
    max_chat_tokens: int = 10_240
    max_inflight_chat_tokens: int = 40_960
    worker_threads: int = 4  # image header checks and output encoding, off the event loop
    stream_write_timeout_s: float = 30.0  # a streaming caller that reads nothing this long is cancelled
    # The slowest an answer (a gRPC stream, an HTTP answer) is taken, in bytes/s on average over the time its writes
    # waited for the caller, once they have waited stream_write_timeout_s: a caller reading a byte now and then
    # held its place for ever. 32 KiB/s (256 kbit/s) cuts no real client: 7 MB of images take 3.6 min at it.
    stream_min_write_rate: int = 32 * 1024
    # An HTTP request's body of which no byte arrives this long is refused (408), and so is one that, after this
    # long, has come slower on average than http_min_body_rate (bytes/s; 64 KiB/s, about 0.5 Mbit/s).
    http_body_timeout_s: float = 60.0
    http_min_body_rate: int = 64 * 1024
    # An HTTP connection with no request in progress (idle between requests, or its headers still coming) is
    # closed after this long: aiohttp's own default kept one for an hour, each holding a file descriptor.
    http_idle_timeout_s: float = 75.0
    # Open HTTP connections at most; past it a new one is answered 503 and closed. 0: half the process's open-file
    # limit (its soft limit raised to the hard one at start), the other half kept for gRPC, Triton and files.
    http_max_connections: int = 0
    # Origins (https://app.example, comma-separated) whose web pages may call the HTTP API; a request with any other
    # Origin header is refused 403, as is, on a loopback --http-listen, a Host that is not a loopback name
    # (serving/frontend/http_origins.py: browsers let any page POST a form here). "": no web page.
    http_allowed_origins: str = ""
    # Output waiting for a streaming caller behind the write in progress (previews, deltas); past it the call ends
    # RESOURCE_EXHAUSTED. 64 MiB: about 20 previews at 1024x1024.
    max_buffered_stream_bytes: int = 64 * MiB
    # A call that ends early (caller gone, run time over, slow reader) holds its slot until its model confirms the
    # stop; past this the Triton stream is cancelled and omnigen2_stop_grace_expired counts it.
    stop_grace_s: float = 10.0
    limits: Limits = field(default=DEFAULT_LIMITS)
    chat_limits: ChatLimits = field(default=DEFAULT_CHAT_LIMITS)

    def __post_init__(self) -> None:
        # The flags' checks (FLAG_TYPES) on a config built in process as well (tests, the stack's replace): the
        # parser checks only text, not the defaults nor values set here.
        for name, kind in FLAG_TYPES.items():
            check_value(f"--{name.replace('_', '-')}", kind, getattr(self, name))
        # Checked here, not when the read gate is made (after Triton's start in `make serve`): a request that the
        # budget cannot hold would wait for room for ever.
        if self.held_request_budget() < 2 * self.max_request_bytes:
            largest = 2 * self.max_request_bytes
            raise SettingError("--max-held-request-bytes", f"must be at least 2 x --max-request-bytes ({largest})")

    def held_request_budget(self) -> int:
        """--max-held-request-bytes, 0 resolved: room to read --max-in-flight requests of the largest size at once,
        and one more for the bytes of calls that admission let go but whose handlers are still ending."""
        return self.max_held_request_bytes or (self.max_in_flight + 1) * 2 * self.max_request_bytes

    def bound_addresses(self) -> list[tuple[str, str, int]]:
        """(flag, host, port) of each TCP port the front end listens on; port 0 (any free one) left out."""
        found = [("--listen", *_host_port(self.listen))]
        if self.http_listen:
            found.append(("--http-listen", *_host_port(self.http_listen)))
        if self.metrics_port:
            found.append(("--metrics-port", self.metrics_address, self.metrics_port))
        return [(flag, host, port) for flag, host, port in found if port]

    @classmethod
    def from_args(
        cls, argv: list[str] | None = None, prog: str = "python -m serving.frontend.server"
    ) -> FrontendConfig:
        return cls(**vars(cls.parser(prog).parse_args(argv)))

    @classmethod
    def parser(cls, prog: str = "python -m serving.frontend.server") -> argparse.ArgumentParser:
        """Its flags, each defaulting to its environment variable, else to the field's default; `prog`: the command
        that reports a bad flag (the stack's, for the flags it passes on)."""
        parser = argparse.ArgumentParser(
            prog=prog,
            description="OmniGen2 gRPC front end; every flag also reads OMNIGEN2_<FLAG> from the environment.",
            formatter_class=HelpFormatter,
        )
        defaults = cls()
        for f in fields(cls):
            if f.name in ("limits", "chat_limits"):
                continue
            default = getattr(defaults, f.name)
            kind = type(default)
            env = f"OMNIGEN2_{f.name.upper()}"
            flag = f"--{f.name.replace('_', '-')}"
            if kind is bool:  # --flag / --no-flag; env 1/0, true/false, yes/no, on/off; empty: the default
                if os.environ.get(env, "").strip():
                    default = _switch(env, os.environ[env])
                parser.add_argument(
                    flag, action=argparse.BooleanOptionalAction, default=default, help=f"{FLAG_HELP[f.name]}; env {env}"
                )
                continue
            parse = FLAG_TYPES.get(f.name)
            bounds = f" ({parse.bounds})" if parse else ""
            parser.add_argument(
                flag,
                type=parse or kind,
                default=from_env(env, parse or kind, default),
                help=f"{FLAG_HELP[f.name]}{bounds}; env {env}",
            )
        env = "OMNIGEN2_LIMITS"
        parser.add_argument(
            "--limits",
            type=limits_flag,
            default=from_env(env, limits_flag, DEFAULT_LIMITS),
            help=f"request limits to change, as JSON (e.g. '{{\"max_steps\": 100}}'); `make serve` hands them to the "
            f"BLS and the engine profiles too; env {env}",
        )
        return parser


def limits_flag(text: str) -> Limits:
    """--limits: a bad name or value is named on the flag's one line."""
    try:
        return limits_from_json(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--limits: ")) from None


def _switch(env: str, value: str) -> bool:
    text = value.strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise SettingError(env, f"{value!r} is not one of 1/0, true/false, yes/no, on/off")


def _host_port(address: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port)."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)

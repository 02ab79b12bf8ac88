"""OmniGen2Client (blocking) and AsyncOmniGen2Client (asyncio) over the OmniGen2 gRPC API.

One server, or several replicas: a list of endpoints (or a comma-separated string) or a `dns:///name:port` target
is balanced by gRPC's own `round_robin` policy, with gRPC client-side health checking so a replica that says
NOT_SERVING (its Triton is down, or it drains) gets no new calls. Idempotent calls that fail with UNAVAILABLE are
tried again, and the round_robin picker sends the new attempt to a replica that is up:
  - GetModelInfo, always;
  - Generate with a seed; the SDK sends a seed with every generation (the caller's, or one it draws), so every
    Generate is idempotent: a repeat on another replica gives the same images;
  - GenerateStream and Understand only before their first event: once the caller has seen progress or text from
    one replica, a repeat would show it again.
Each result names the replica that served it (`served_by`, from the server's x-served-by metadata) and the call's
request id (`request_id`, the same x-request-id on every attempt, so the server logs tie the attempts together).
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import secrets
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, Unpack

import grpc

from omnigen2.errors import from_rpc_error
from omnigen2.limits import RANDOM_SEEDS
from omnigen2.messages import (
    ChatTurn,
    GenerationOptions,
    GenerationResult,
    ImageInput,
    Images,
    Progress,
    UnderstandOptions,
    UnderstandResult,
    build_request,
    build_understand_request,
)
from omnigen2.v1 import omnigen2_pb2 as pb
from omnigen2.v1 import omnigen2_pb2_grpc as pb_grpc

DEFAULT_PORT = 50051  # the front end's gRPC port (`make serve`)
DEFAULT_SERVER = f"127.0.0.1:{DEFAULT_PORT}"
# gRPC's own target schemes (the name resolvers it ships); other URLs (http://, grpc://) are refused.
_GRPC_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:")
_RESOLVER_SCHEMES = ("dns:", "ipv4:", "ipv6:")
_LOCAL_SCHEMES = ("unix:", "unix-abstract:")  # gRPC targets that cannot leave this machine (vsock: can)
MAX_MESSAGE_BYTES = 512 * 1024 * 1024
SERVICE = pb.DESCRIPTOR.services_by_name["OmniGen2"].full_name
REQUEST_ID = "x-request-id"  # sent by the SDK, the same on every attempt of one call; echoed by the server
SERVED_BY = "x-served-by"  # the replica that served the call, in the server's initial metadata
Event = Progress | GenerationResult
Servers = str | Sequence[str]
_Result = TypeVar("_Result", GenerationResult, UnderstandResult)
_T = TypeVar("_T")


@dataclass(frozen=True)
class Target:
    address: str  # what the channel is opened on
    balanced: bool  # round_robin over the resolver's addresses
    authority: str = ""  # an address list's :authority and TLS name: its first endpoint as given
    shown: str = ""  # the endpoints as tried (default port added), for errors


def channel_target(server: Servers) -> Target:
    """The gRPC target for `server`, and whether gRPC balances over its addresses.

    "host:port": one server (gRPC's default pick_first); a host without a port gets 50051, the front end's (gRPC's
    own default would be 443). "dns:///name:port" (or ipv4:/ipv6: lists): every address the resolver returns,
    re-resolved when a connection drops (a Kubernetes headless Service). Several endpoints (a list, or "a:1,b:2"):
    IP literals as given, names resolved once here (gRPC takes one address family per channel, so IPv4 and IPv6
    endpoints do not mix). A URL (http://, grpc://) is refused: gRPC would take it for a host name.
    """
    items = [server] if isinstance(server, str) else list(server)
    endpoints = [_with_port(part.strip()) for item in items for part in item.split(",") if part.strip()]
    if not endpoints:
        raise ValueError("server: no address given")
    shown = ", ".join(endpoints)
    if len(endpoints) == 1:
        return Target(endpoints[0], endpoints[0].startswith(_RESOLVER_SCHEMES), shown=shown)
    addresses = [_address(endpoint) for endpoint in endpoints]
    families = {family for family, _ in addresses}
    if len(families) > 1:
        raise ValueError(f"server: IPv4 and IPv6 endpoints do not mix in one channel: {shown}")
    return Target(f"{families.pop()}:{','.join(address for _, address in addresses)}", True, endpoints[0], shown)


def on_this_machine(server: Servers) -> bool:
    """Whether every endpoint of `server` (as channel_target takes it: host:port, lists, gRPC target URIs) is
    loopback, localhost or a Unix socket: a token may go there without TLS. Any other host name counts as remote,
    as it is not resolved here (it may resolve elsewhere tomorrow)."""
    return _all_local(channel_target(server))


def _all_local(target: Target) -> bool:
    return all(_local(endpoint) for endpoint in target.shown.split(", "))


def _local(endpoint: str) -> bool:
    if endpoint.startswith(_LOCAL_SCHEMES):
        return True
    if endpoint.startswith(_RESOLVER_SCHEMES):  # dns:///host:port, dns://resolver/host:port, ipv4:host:port
        endpoint = endpoint.split(":", 1)[1].rsplit("/", 1)[-1]
    host = endpoint.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_loopback or ip.is_unspecified  # connecting to 0.0.0.0 or [::] reaches this machine


def _check_token_route(target: Target, token: str | None, tls: bool | bytes, allow_plaintext_token: bool) -> None:
    """Refuses, before any connection, a token that would cross a network in cleartext (anyone on the path could
    read it and call as its holder): TLS on, every endpoint on this machine, or the caller's explicit opt-out."""
    if token and tls is False and not allow_plaintext_token and not _all_local(target):
        raise ValueError(
            f"token: it would go in cleartext to {target.shown}, readable on the way: turn `tls` on "
            "(tls=True or a PEM root certificate; the CLI's --tls or --tls-ca; a server started with --tls-cert), or "
            "`allow_plaintext_token` (--allow-plaintext-token) on a network you trust"
        )


def _with_port(endpoint: str) -> str:
    """`endpoint` with the default port when it names none; gRPC target URIs as they are, other URLs refused."""
    if endpoint.startswith(_GRPC_SCHEMES):
        return endpoint
    _, slashes, rest = endpoint.partition("://")
    if slashes:  # https:// would ask for TLS, and http:// is the OpenAI API's port: say what to give instead
        host = rest.split("/")[0] or "127.0.0.1"
        raise ValueError(
            f"server: {endpoint!r} is a URL, not host:port: give e.g. {host if ':' in host else _with_port(host)} "
            f"(the gRPC port, {DEFAULT_PORT} unless the server was started with another; TLS: tls=True, --tls)"
        )
    try:  # an IPv6 literal without brackets, so without a port
        return f"[{ipaddress.IPv6Address(endpoint)}]:{DEFAULT_PORT}"
    except ValueError:
        pass
    if endpoint.endswith("]") or ":" not in endpoint:
        return f"{endpoint}:{DEFAULT_PORT}"
    return endpoint


def _address(endpoint: str) -> tuple[str, str]:
    host, colon, port = endpoint.rpartition(":")
    if not colon or not port.isdigit():
        raise ValueError(f"server: {endpoint!r} is not host:port")
    host = host.strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        try:
            resolved = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)[0][4][0]
        except OSError as exc:
            raise ValueError(f"server: cannot resolve {host!r}: {exc}") from None
        ip = ipaddress.ip_address(resolved)
    return ("ipv4", f"{ip}:{port}") if ip.version == 4 else ("ipv6", f"[{ip}]:{port}")


def channel_options(balanced: bool = False) -> list[tuple[str, Any]]:
    """Message sizes; balanced channels add round_robin and client-side health checking. No gRPC retry policy: the
    SDK's own loop retries UNAVAILABLE through the picker, and a channel policy under it would multiply the attempts
    (up to 5 per SDK attempt), so a call makes at most `retries` + 1 attempts. gRPC's transparent retries (a call
    that never left the client) stay, as they reach no server.
    """
    policy: dict[str, Any] = {}
    if balanced:
        policy["loadBalancingConfig"] = [{"round_robin": {}}]
        policy["healthCheckConfig"] = {"serviceName": SERVICE}
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.service_config", json.dumps(policy)),
    ]


def _credentials(tls: bool | bytes) -> grpc.ChannelCredentials | None:
    """tls=True: verify the server against the system's CAs; bytes: against this PEM root certificate."""
    if tls is False:
        return None
    return grpc.ssl_channel_credentials(root_certificates=tls if isinstance(tls, bytes) else None)


def _channel_settings(
    target: Target, tls: bool | bytes
) -> tuple[list[tuple[str, Any]], grpc.ChannelCredentials | None]:
    """The options and credentials of a channel to `target`, blocking or asyncio alike."""
    options = channel_options(target.balanced)
    if target.authority:
        options.append(("grpc.default_authority", target.authority))
    return options, _credentials(tls)


def _open_channel(target: Target, tls: bool | bytes) -> grpc.Channel:
    options, credentials = _channel_settings(target, tls)
    if credentials is None:
        return grpc.insecure_channel(target.address, options)
    return grpc.secure_channel(target.address, credentials, options)


def _open_aio_channel(target: Target, tls: bool | bytes) -> grpc.aio.Channel:
    options, credentials = _channel_settings(target, tls)
    if credentials is None:
        return grpc.aio.insecure_channel(target.address, options)
    return grpc.aio.secure_channel(target.address, credentials, options)


@dataclass(frozen=True)
class _Attempts:
    """The attempts of one call: one request id and one deadline over all of them, and when to try again."""

    metadata: tuple[tuple[str, str], ...]
    deadline: float | None
    retries: int  # further attempts allowed; 0 for a call that is not idempotent

    def timeout(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def again(self, error: grpc.RpcError, attempt: int) -> float | None:
        """Seconds to wait before the next attempt, or None: only UNAVAILABLE, within the retries and the deadline."""
        if error.code() != grpc.StatusCode.UNAVAILABLE or attempt >= self.retries:
            return None
        delay = min(0.1 * 2.0**attempt, 2.0)  # 2.0: int ** int may be a float (negative powers), typed Any
        if self.deadline is not None and time.monotonic() + delay >= self.deadline:
            return None
        return delay

    def served(self, metadata: Sequence[tuple[str, str | bytes]] | None, result: _Result) -> _Result:
        values = dict(metadata or ())
        served_by = values.get(SERVED_BY, "")
        return dataclasses.replace(
            result, served_by=served_by if isinstance(served_by, str) else "", request_id=self.metadata[-1][1]
        )


def _seeded(options: GenerationOptions) -> GenerationOptions:
    """A generation with a seed is idempotent, so it may be repeated on another replica; draw one if none is given
    (the server's range for drawn ones, [0, 2^53)); the result reports it either way."""
    if options.get("seed") is None:
        return {**options, "seed": secrets.randbelow(RANDOM_SEEDS)}
    return options


NO_DEADLINE_S = 1e9  # a timeout this long (32 years) or longer is no deadline


class _Calls:
    """What every call carries: the default deadline, the bearer token when there is one, and a request id."""

    def __init__(self, timeout: float | None, token: str | None, retries: int, server: str) -> None:
        self._server = server  # the address(es) called, named when no server answers there
        if retries < 0:
            raise ValueError(f"retries: 0 or more further attempts after UNAVAILABLE, got {retries}")
        if timeout is not None and not timeout > 0:  # NaN too: gRPC took NaN, 0 and less as a deadline passed
            raise ValueError(f"timeout: seconds over 0, or None (or inf) for no deadline, got {timeout}")
        # gRPC took a deadline past 2^63 ns from the epoch (from about 1e10 s on, inf too) as one already passed.
        self.timeout = None if timeout is None or timeout >= NO_DEADLINE_S else timeout
        self.retries = retries
        self._auth: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()

    def _attempts(self, idempotent: bool) -> _Attempts:
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        metadata = (*self._auth, (REQUEST_ID, uuid.uuid4().hex))
        return _Attempts(metadata, deadline, self.retries if idempotent else 0)


def _generate_event(event: pb.GenerateEvent, attempts: _Attempts, metadata: Any) -> Event:
    if event.HasField("progress"):
        return Progress.from_proto(event.progress)
    return attempts.served(metadata, GenerationResult.from_proto(event.result))


def _understand_event(event: pb.UnderstandEvent, attempts: _Attempts, metadata: Any) -> str | UnderstandResult:
    if event.HasField("delta"):
        return str(event.delta)
    return attempts.served(metadata, UnderstandResult.from_proto(event.result))


def _last_result(stream: Iterator[str | UnderstandResult]) -> UnderstandResult:
    result = None
    for item in stream:
        if isinstance(item, UnderstandResult):
            result = item
    assert result is not None  # a stream ends with its result or raises
    return result


class OmniGen2Client(_Calls):
    """Blocking client. `timeout` (seconds) is the default deadline of each call; None (or inf) waits forever.
    `token` is sent as a bearer token; `tls` turns on TLS (True: system CAs; bytes: a PEM root certificate to trust).
    A token without TLS to a server not on this machine (loopback, localhost, a Unix socket; every replica of a list)
    raises ValueError before connecting, unless `allow_plaintext_token`: it would cross the network readable.

    >>> client = OmniGen2Client("127.0.0.1:50051")
    >>> client.generate("A red apple on a table", steps=30, seed=7).images[0].save("apple.png")
    """

    def __init__(
        self,
        server: Servers = DEFAULT_SERVER,
        *,
        timeout: float | None = 600.0,
        retries: int = 4,
        token: str | None = None,
        tls: bool | bytes = False,
        allow_plaintext_token: bool = False,
    ) -> None:
        target = channel_target(server)
        _check_token_route(target, token, tls, allow_plaintext_token)
        super().__init__(timeout, token, retries, target.shown)
        self._channel: grpc.Channel = _open_channel(target, tls)
        self._stub: pb_grpc.OmniGen2Stub = pb_grpc.OmniGen2Stub(self._channel)

    def generate(self, prompt: str, images: Images = (), **options: Unpack[GenerationOptions]) -> GenerationResult:
        """Text-to-image, or with `images` any of the image tasks; returns when the images are done.

        `images`: one image (a path, bytes or a PIL image) or a sequence of them; a str is one path, never a list of
        letters. The same holds for every method that takes `images`.
        """
        request = build_request(prompt, images, _seeded(options))

        def once(attempts: _Attempts) -> GenerationResult:
            response, call = self._stub.Generate.with_call(
                request, timeout=attempts.timeout(), metadata=attempts.metadata
            )
            return attempts.served(call.initial_metadata(), GenerationResult.from_proto(response))

        return self._unary(once)

    def _unary(self, once: Callable[[_Attempts], _T]) -> _T:
        """An idempotent unary call; UNAVAILABLE is tried again through the picker, up to `retries` more times."""
        attempts = self._attempts(idempotent=True)
        for attempt in range(attempts.retries + 1):
            try:
                return once(attempts)
            except grpc.RpcError as exc:
                delay = attempts.again(exc, attempt)
                if delay is None:
                    raise from_rpc_error(exc, self._server) from None
                time.sleep(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def edit(self, image: ImageInput, instruction: str, **options: Unpack[GenerationOptions]) -> GenerationResult:
        """Edit one image by an instruction ("Make the sky stormy")."""
        return self.generate(instruction, [image], **options)

    def compose(self, images: Images, prompt: str, **options: Unpack[GenerationOptions]) -> GenerationResult:
        """A new image from up to 5 input images and a prompt that refers to them."""
        return self.generate(prompt, images, **options)

    def stream(
        self,
        prompt: str,
        images: Images = (),
        *,
        previews: bool = False,
        **options: Unpack[GenerationOptions],
    ) -> Iterator[Event]:
        """A Progress per denoising step (with a preview image if asked), then the GenerationResult.

        Stopping the iteration early (break, close()) cancels the generation on the server.
        """
        request = build_request(prompt, images, _seeded(options), previews)
        yield from self._events(self._stub.GenerateStream, request, _generate_event)

    def _events(self, method: Any, request: Any, convert: Callable[[Any, _Attempts, Any], Any]) -> Iterator[Any]:
        """A stream's events; UNAVAILABLE before the first one is tried again (the caller has seen nothing yet)."""
        attempts = self._attempts(idempotent=True)
        for attempt in range(attempts.retries + 1):
            call = method(request, timeout=attempts.timeout(), metadata=attempts.metadata)
            started = False
            try:
                metadata = call.initial_metadata()  # blocks until the server answers or the call fails
                for message in call:
                    started = True
                    yield convert(message, attempts, metadata)
                return
            except grpc.RpcError as exc:
                delay = None if started else attempts.again(exc, attempt)
                if delay is None:
                    raise from_rpc_error(exc, self._server) from None
            finally:
                call.cancel()  # a no-op once the stream has ended
            time.sleep(delay)

    def understand_stream(
        self,
        prompt: str | Sequence[ChatTurn],
        images: Images = (),
        **options: Unpack[UnderstandOptions],
    ) -> Iterator[str | UnderstandResult]:
        """The answer's text pieces as they are generated, then the UnderstandResult.

        `prompt` is a question about `images`, or a whole conversation (ChatTurn list, images inside).
        Stopping the iteration early cancels the generation on the server.
        """
        request = build_understand_request(prompt, images, options)
        yield from self._events(self._stub.Understand, request, _understand_event)

    def understand(
        self,
        prompt: str | Sequence[ChatTurn],
        images: Images = (),
        **options: Unpack[UnderstandOptions],
    ) -> UnderstandResult:
        """The whole answer at once: `client.understand("What is in the picture?", "cat.png").text` (one image, or a
        list of them)."""
        return _last_result(self.understand_stream(prompt, images, **options))

    def info(self) -> pb.ModelInfo:
        """The served model: limits, defaults, schedulers, formats, backend and checkpoint hash."""

        def once(attempts: _Attempts) -> pb.ModelInfo:
            info: pb.ModelInfo = self._stub.GetModelInfo(
                pb.GetModelInfoRequest(), timeout=attempts.timeout(), metadata=attempts.metadata
            )
            return info

        return self._unary(once)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> OmniGen2Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncOmniGen2Client(_Calls):
    """The asyncio twin of OmniGen2Client, for many concurrent calls from one event loop."""

    def __init__(
        self,
        server: Servers = DEFAULT_SERVER,
        *,
        timeout: float | None = 600.0,
        retries: int = 4,
        token: str | None = None,
        tls: bool | bytes = False,
        allow_plaintext_token: bool = False,
    ) -> None:
        target = channel_target(server)
        _check_token_route(target, token, tls, allow_plaintext_token)
        super().__init__(timeout, token, retries, target.shown)
        self._channel: grpc.aio.Channel = _open_aio_channel(target, tls)
        self._stub: pb_grpc.OmniGen2Stub = pb_grpc.OmniGen2Stub(self._channel)

    async def generate(
        self, prompt: str, images: Images = (), **options: Unpack[GenerationOptions]
    ) -> GenerationResult:
        request = build_request(prompt, images, _seeded(options))

        async def once(attempts: _Attempts) -> GenerationResult:
            call = self._stub.Generate(request, timeout=attempts.timeout(), metadata=attempts.metadata)
            response = await call
            return attempts.served(await call.initial_metadata(), GenerationResult.from_proto(response))

        return await self._unary(once)

    async def _unary(self, once: Callable[[_Attempts], Awaitable[_T]]) -> _T:
        """An idempotent unary call; UNAVAILABLE is tried again through the picker, up to `retries` more times."""
        attempts = self._attempts(idempotent=True)
        for attempt in range(attempts.retries + 1):
            try:
                return await once(attempts)
            except grpc.RpcError as exc:
                delay = attempts.again(exc, attempt)
                if delay is None:
                    raise from_rpc_error(exc, self._server) from None
                await asyncio.sleep(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def edit(self, image: ImageInput, instruction: str, **options: Unpack[GenerationOptions]) -> GenerationResult:
        return await self.generate(instruction, [image], **options)

    async def compose(self, images: Images, prompt: str, **options: Unpack[GenerationOptions]) -> GenerationResult:
        return await self.generate(prompt, images, **options)

    async def stream(
        self,
        prompt: str,
        images: Images = (),
        *,
        previews: bool = False,
        **options: Unpack[GenerationOptions],
    ) -> AsyncIterator[Event]:
        request = build_request(prompt, images, _seeded(options), previews)
        async for event in self._events(self._stub.GenerateStream, request, _generate_event):
            yield event

    async def _events(
        self, method: Any, request: Any, convert: Callable[[Any, _Attempts, Any], Any]
    ) -> AsyncIterator[Any]:
        attempts = self._attempts(idempotent=True)
        for attempt in range(attempts.retries + 1):
            call = method(request, timeout=attempts.timeout(), metadata=attempts.metadata)
            started = False
            try:
                metadata = await call.initial_metadata()
                async for message in call:
                    started = True
                    yield convert(message, attempts, metadata)
                return
            except grpc.RpcError as exc:
                delay = None if started else attempts.again(exc, attempt)
                if delay is None:
                    raise from_rpc_error(exc, self._server) from None
            finally:
                call.cancel()
            await asyncio.sleep(delay)

    async def understand_stream(
        self,
        prompt: str | Sequence[ChatTurn],
        images: Images = (),
        **options: Unpack[UnderstandOptions],
    ) -> AsyncIterator[str | UnderstandResult]:
        request = build_understand_request(prompt, images, options)
        async for item in self._events(self._stub.Understand, request, _understand_event):
            yield item

    async def understand(
        self,
        prompt: str | Sequence[ChatTurn],
        images: Images = (),
        **options: Unpack[UnderstandOptions],
    ) -> UnderstandResult:
        result = None
        async for item in self.understand_stream(prompt, images, **options):
            if isinstance(item, UnderstandResult):
                result = item
        assert result is not None  # a stream ends with its result or raises
        return result

    async def info(self) -> pb.ModelInfo:
        async def once(attempts: _Attempts) -> pb.ModelInfo:
            info: pb.ModelInfo = await self._stub.GetModelInfo(
                pb.GetModelInfoRequest(), timeout=attempts.timeout(), metadata=attempts.metadata
            )
            return info

        return await self._unary(once)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncOmniGen2Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

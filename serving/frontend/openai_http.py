"""The OpenAI-compatible HTTP API: a gateway in the front end's process that calls the gRPC service.

Each HTTP request becomes one call of the OmniGen2 gRPC service over a Unix socket that only this process can
open, with the caller's `Authorization` header as the call's metadata: authentication, scopes, rate limits,
admission, validation, budgets, metrics and the access log are the gRPC service's, one implementation for both
APIs, and the gateway only translates (serving/frontend/openai_requests.py, openai_answers.py) and maps statuses
(serving/frontend/openai_errors.py). Three checks come first, so that no body is read for nothing: what a web page
sent (serving/frontend/http_origins.py) is refused 403, an unknown bearer token 401, and past max_in_flight requests
with bodies in the gateway, 429. Past
--http-max-connections open connections, a new one is answered 503 and closed unread. Routes (docs/api.md):

    GET  /v1/models                  GetModelInfo
    POST /v1/images/generations      Generate (JSON); `stream: true`: GenerateStream as server-sent events
    POST /v1/images/edits            the same with 1-5 input images (multipart: `image` or `image[]`)
    POST /v1/chat/completions        Understand; `stream: true` answers as server-sent events
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import ssl
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

import grpc
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from omnigen2.v1 import omnigen2_pb2 as pb
from omnigen2.v1 import omnigen2_pb2_grpc as pb_grpc

from serving.frontend import access_log, request_id
from serving.frontend.auth import TokenRegistry
from serving.frontend.config import FrontendConfig
from serving.frontend.http_connections import Counted, Refused, open_files, unavailable
from serving.frontend.http_malformed import MalformedRequests, ParseErrorHandler, reason
from serving.frontend.http_origins import OriginGuard
from serving.frontend.metrics import Metrics
from serving.frontend.openai_answers import (
    all_withheld_error,
    chat_answer,
    chat_chunk,
    image_answer,
    image_event,
    image_usage,
    withheld_event,
)
from serving.frontend.openai_errors import OpenAIError, bad_request, cut, from_rpc
from serving.frontend.openai_requests import MODEL_ID, ChatCall, ImageCall, Names, chat_call, image_call
from serving.frontend.pace import Pace

log = logging.getLogger("omnigen2.http")
T = TypeVar("T")
MiB = 1024 * 1024
# Typed keys of what a request carries between the handler and the middleware (aiohttp warns at string keys).
_REQUEST_ID = web.RequestKey("request_id", str)
# The status the access log and metrics record, where it is not the response's (499: the caller left).
_STATUS = web.RequestKey("status", int)
# The most parts an edits form may have: its fields, cfg_range's two values and five images fit many times over.
FORM_FIELDS = 100
_ANSWER = web.RequestKey["_Progress"]("answer")  # the answer's write progress
# Set once a stream's last event is handed to aiohttp (which cannot say when it left the process): the caller leaving
# then is not 499.
_DELIVERED = web.RequestKey("delivered", bool)
_NO_NAMES = Names()
# The most commas a JSON body may hold: a request the service takes has far fewer (its texts are a few thousand
# tokens, its images base64 strings, which have none); json.loads of this many values takes about 0.1 s.
MAX_JSON_COMMAS = 1_000_000


def body_limit(max_request_bytes: int) -> int:
    """The largest HTTP body read: a request at the gRPC limit, base64-encoded (4/3) as data URLs are, plus room
    for the JSON around it. Within it, the gRPC service refuses what is over its limit naming the field."""
    return max_request_bytes * 4 // 3 + MiB


class OpenAIGateway:
    def __init__(
        self, config: FrontendConfig, target: str, metrics: Metrics, tokens: TokenRegistry | None = None
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.target = target  # the gRPC service, on a Unix socket of this process
        self.limit = body_limit(config.max_request_bytes)
        # Before a body (up to `limit` bytes, and its decoded copies) is read: the caller's token is one the service
        # knows (the service still checks scope and rate), and at most max_in_flight requests with bodies are in
        # the gateway at once, as many as the service admits; beyond, 429 unread.
        self.tokens = tokens
        self.bodies = asyncio.Semaphore(config.max_in_flight)
        app = web.Application(client_max_size=self.limit, client_max_fields=FORM_FIELDS, middlewares=[self._middleware])
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/images/generations", self.generations)
        app.router.add_post("/v1/images/edits", self.edits)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.on_response_prepare.append(self._add_request_id)
        self.runner = web.AppRunner(
            app,
            access_log=None,
            handler_cancellation=True,
            shutdown_timeout=config.shutdown_grace_s,
            keepalive_timeout=config.http_idle_timeout_s,  # also bounds a connection whose headers never end
            # Bodies are taken as sent (compressed ones are refused, _body): aiohttp would inflate them, 81 KB of
            # gzip into 84 MB, while the size limit applied to the bytes on the wire.
            auto_decompress=False,
        )
        self.listener: asyncio.Server | None = None
        self.max_connections = 0  # set by start(), from the open-file limit unless --http-max-connections is given
        self.connections = 0  # open ones, served by aiohttp
        self.refusal = unavailable("too many connections here; retry later", max(1, math.ceil(config.retry_after_s)))
        self.channel: grpc.aio.Channel | None = None
        self.cut_at: float | None = None  # set by stop(): requests still running then are cut by the server
        self.stub: pb_grpc.OmniGen2Stub | None = None
        self.malformed = MalformedRequests(metrics.http_malformed_requests)
        # What a web page may send; start() tells it the listen address.
        self.guard = OriginGuard(config.http_allowed_origins)

    async def start(self, listen: str) -> int:
        """Serve on `listen` (host:port, port 0 for any free one); returns the port."""
        self.channel = grpc.aio.insecure_channel(
            self.target,
            options=[
                ("grpc.max_send_message_length", -1),  # the service itself refuses requests over its limit
                ("grpc.max_receive_message_length", self.config.max_response_bytes),
            ],
        )
        self.stub = pb_grpc.OmniGen2Stub(self.channel)
        await self.runner.setup()
        host, _, port = listen.rpartition(":")
        self.guard.listening(host, tokens=self.tokens is not None)
        context = None
        if self.config.tls_cert:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(self.config.tls_cert, self.config.tls_key)
        files = open_files()
        self.max_connections = self.config.http_max_connections or max(1, files // 2)  # 0: half the files
        self.metrics.max_http_connections.set(self.max_connections)
        log.info(
            "at most %d HTTP connections (--http-max-connections; open-file limit %d)", self.max_connections, files
        )
        # Not aiohttp's TCPSite: its protocol factory is where a connection past the bound is turned away.
        self.listener = await asyncio.get_running_loop().create_server(
            self._connection,
            host.strip("[]") or None,
            int(port),
            ssl=context,
            ssl_handshake_timeout=self.config.tls_handshake_timeout_s if context else None,
            backlog=128,
        )
        return int(self.listener.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stops listening, then gives requests in flight the grace period to finish."""
        self.cut_at = time.monotonic() + self.config.shutdown_grace_s
        if self.listener is not None:
            self.listener.close()
        await self.runner.cleanup()
        if self.channel is not None:
            await self.channel.close()

    def _connection(self) -> asyncio.Protocol:
        """A new connection's protocol: aiohttp's, or past max_connections a 503 and close: each connection holds a
        file descriptor, and connections opened faster than --http-idle-timeout-s closed them ran the process out
        of them, its gRPC API included. Counted from connection_made, so one burst of accepts (up to the backlog)
        may pass the bound; a TLS handshake in progress (bounded by --tls-handshake-timeout-s) is not counted yet."""
        if self.connections >= self.max_connections:
            self.metrics.http_connections_refused.inc()
            return Refused(self.refusal)
        server = self.runner.server
        assert server is not None, "start() first"
        # What server() makes, aiohttp's protocol with the options given to the runner, its parser errors answered
        # and logged by http_malformed.
        handler = ParseErrorHandler(server, self.malformed, loop=asyncio.get_running_loop(), **server._kwargs)
        return Counted(handler, self)

    # Routes

    async def models(self, request: web.Request) -> web.Response:
        info = await self._unary(request, self._stub.GetModelInfo, pb.GetModelInfoRequest(), _NO_NAMES)
        model = {"id": info.model or MODEL_ID, "object": "model", "created": 0, "owned_by": "omnigen2"}
        return web.json_response({"object": "list", "data": [model]})

    async def generations(self, request: web.Request) -> web.StreamResponse:
        body = await self._json(request)
        call = await self._off_loop(image_call, body, [])
        return await self._images(request, call, "image_generation")

    async def edits(self, request: web.Request) -> web.StreamResponse:
        fields, images = await self._form(request)
        if not images:
            raise bad_request("image", "required: 1 image to edit, or up to 5 to compose from", "missing_required")
        call = await self._off_loop(functools.partial(image_call, form=True), fields, images)
        return await self._images(request, call, "image_edit")

    async def _images(self, request: web.Request, call: ImageCall, route: str) -> web.StreamResponse:
        """One JSON answer, or with `stream: true` server-sent events: a partial image per preview before the last
        step (up to `partial_images`), then a completed event per image."""
        if not call.stream:
            response = await self._unary(request, self._stub.Generate, call.request, call.names)
            return web.json_response(await self._off_loop(image_answer, response))

        async def answer(first: pb.GenerateEvent, events: AsyncIterator[pb.GenerateEvent]) -> web.StreamResponse:
            sent = self._image_events(call, route, first, events)
            return await self._sse(request, call.names, sent, error_event="error", done=False)

        return await self._call_stream(request, self._stub.GenerateStream, call.request, call.names, answer)

    async def _image_events(
        self, call: ImageCall, route: str, first: pb.GenerateEvent, events: AsyncIterator[pb.GenerateEvent]
    ) -> AsyncIterator[tuple[str | None, dict[str, Any]]]:
        """OpenAI's image stream events: partial images, then a completed event per generated image, in order (a
        withheld image's in its place, saying so; with every image withheld, an error event instead). Base64 of
        megabytes runs off the event loop."""
        event, partials = first, 0
        while event.HasField("progress"):
            progress = event.progress  # the last step's preview is the final image: not a partial one
            last = progress.step == progress.total_steps
            if progress.HasField("preview") and not last and partials < call.partial_images:
                partial = await self._off_loop(image_event, route, progress.preview, partial_index=partials)
                yield partial["type"], partial
                partials += 1
            event = await anext(events)
        result = event.result
        if result.withheld and not result.images:
            yield "error", all_withheld_error(result)
            return
        withheld = {image.index: image for image in result.withheld}
        count = len(result.images) + len(withheld)
        kept = iter(result.images)
        for index in range(count):
            usage = image_usage(result.usage, count, with_input=index == 0)
            if index in withheld:
                completed = withheld_event(route, withheld[index], result.seed, usage)
            else:
                completed = await self._off_loop(image_event, route, next(kept), seed=result.seed, usage=usage)
            yield completed["type"], completed

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._json(request)
        call = await self._off_loop(chat_call, body, self.config.chat_limits)

        async def answer(first: pb.UnderstandEvent, events: AsyncIterator[pb.UnderstandEvent]) -> web.StreamResponse:
            if call.stream:
                return await self._sse(request, call.names, self._chunks(request, call, first, events))
            event = first
            while not event.HasField("result"):
                event = await anext(events)
            return web.json_response(chat_answer(event.result, request[_REQUEST_ID]))

        return await self._call_stream(request, self._stub.Understand, call.request, call.names, answer)

    async def _chunks(
        self, request: web.Request, call: ChatCall, first: pb.UnderstandEvent, events: AsyncIterator[pb.UnderstandEvent]
    ) -> AsyncIterator[tuple[str | None, dict[str, Any]]]:
        """The answer in OpenAI's chunk format."""
        rid = request[_REQUEST_ID]
        yield None, chat_chunk(rid, {"role": "assistant", "content": ""})
        event = first
        while not event.HasField("result"):
            yield None, chat_chunk(rid, {"content": event.delta})
            event = await anext(events)
        yield None, chat_chunk(rid, None, finish=event.result)
        if call.include_usage:
            yield None, chat_chunk(rid, None, with_usage=event.result)

    async def _call_stream(
        self,
        request: web.Request,
        method: Any,
        message: Any,
        names: Names,
        answer: Callable[[Any, AsyncIterator[Any]], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        """Calls a streaming RPC and answers from its events. The HTTP status waits for the first event, so a
        refused call is still an HTTP error. When the answer ends early (the caller disconnected: aiohttp cancels
        the handler; an error) the call is cancelled, which stops the work."""
        stream = method(message, metadata=self._metadata(request))
        try:
            events = aiter(stream)
            first = await anext(events)
            return await answer(first, events)
        except grpc.RpcError as error:
            raise from_rpc(error, names.param, self.config.retry_after_s) from None
        finally:
            stream.cancel()  # a no-op once the call is done

    async def _sse(
        self,
        request: web.Request,
        names: Names,
        events: AsyncIterator[tuple[str | None, dict[str, Any]]],
        error_event: str | None = None,
        done: bool = True,
    ) -> web.StreamResponse:
        """Server-sent events (`event:` lines where a name is given), ending with `data: [DONE]` if `done`. An error
        after the first event is sent as an event with OpenAI's error body (the status line has gone)."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)

        async def send(name: str | None, payload: Mapping[str, Any]) -> None:
            line = f"event: {name}\n" if name else ""
            await self._write(request, response.write(f"{line}data: {json.dumps(payload)}\n\n".encode()))

        try:
            async for name, payload in events:
                await send(name, payload)
        except grpc.RpcError as error:
            failure = from_rpc(error, names.param, self.config.retry_after_s)
            request[_STATUS] = failure.status
            body = failure.body()
            await send(error_event, {"type": error_event, **body} if error_event else body)
        if done:
            await self._write(request, response.write(b"data: [DONE]\n\n"))
        # The whole answer is the caller's: one that reads it and closes at once cancels what is left of the handler
        # (the body's end, the call's), and that is not the caller gone before its answer.
        request[_STATUS] = request.get(_STATUS) or response.status
        request[_DELIVERED] = True
        await self._write(request, response.write_eof())
        return response

    async def _write(self, request: web.Request, write: Awaitable[None]) -> None:
        """A caller that takes nothing of its answer for --stream-write-timeout-s is cut off (408 in the log and the
        metrics, whatever its call ended with): aiohttp's writes wait for as long as the connection stays open, and
        the request held its place in the gateway, and the answer's bytes, all that time. So is one that, once its
        writes have waited that long, has taken the answer slower than --stream-min-write-rate on average over their
        waits (a byte per timeout held the place for ever). Judged by progress, not by the answer's length: one of
        megabytes to a slow but steady reader takes as long as it takes, and time spent on the work between an
        answer's events is not the caller's."""
        progress = request.get(_ANSWER)
        if progress is None:
            rate = self.config.stream_min_write_rate
            progress = request[_ANSWER] = _Progress(lambda: _taken(request), self.config.stream_write_timeout_s, rate)
        try:
            await progress.wait(write)
        except _StalledError as stalled:
            request[_STATUS] = 408  # not the call's status, when this was the write of its error
            self.metrics.cut_off.labels("http", "answer", stalled.reason).inc()
            if request.transport is not None:
                request.transport.abort()
            timeout = progress.timeout_s
            message = (
                f"the caller took its answer slower than {progress.pace.min_rate:g} bytes/s after a {timeout:g} s grace"
                if stalled.slow
                else f"the caller took nothing for {timeout:g} s"
            )
            raise OpenAIError(408, message, code="timeout") from None

    # Reading requests

    async def _json(self, request: web.Request) -> dict[str, Any]:
        if request.content_type != "application/json":
            raise OpenAIError(415, f"the body must be application/json, got {request.content_type or 'none'}")
        raw = await self._body(request, request.read)
        body = await self._off_loop(_parse_json, raw)
        if not isinstance(body, dict):
            raise OpenAIError(400, "the body must be a JSON object", code="invalid_json")
        return body

    async def _form(self, request: web.Request) -> tuple[dict[str, Any], list[bytes]]:
        """Multipart fields (text values as strings; `name[]` or a repeated `name` as a list for the list fields
        image and cfg_range) and the image files in order."""
        if request.content_type != "multipart/form-data":
            raise OpenAIError(415, f"the body must be multipart/form-data, got {request.content_type or 'none'}")
        form = await self._body(request, request.post)
        fields: dict[str, Any] = {}
        images: list[bytes] = []
        for key, value in form.items():
            name = key.removesuffix("[]")
            if name == "image":
                if not isinstance(value, web.FileField):
                    raise bad_request(f"image[{len(images)}]", "must be a file part", "invalid_type")
                images.append(await self._off_loop(value.file.read))
            elif isinstance(value, web.FileField):
                raise bad_request(name, "a file where text belongs (mask is not taken: edits follow the prompt)")
            elif name == "cfg_range":
                fields.setdefault(name, []).append(value)
            elif name != key:
                raise bad_request(
                    name,
                    f"takes one value: send it as `{cut(name)}`, not `{cut(key)}` (only image and cfg_range are lists)",
                )
            elif name in fields:
                raise bad_request(name, "given more than once")
            else:
                fields[name] = value
        return fields, images

    async def _body(self, request: web.Request, read: Callable[[], Awaitable[T]]) -> T:
        """Refuses a compressed body, and one over the limit by its Content-Length, before reading it; one that
        states none is cut off as it passes the limit."""
        encodings = [e.strip() for value in request.headers.getall("Content-Encoding", []) for e in value.split(",")]
        encoded = [e for e in encodings if e and e.lower() != "identity"]
        if encoded:  # OpenAI's API and clients send bodies uncompressed
            message = f"the body must not be compressed, got Content-Encoding {', '.join(encoded)}; send it as is"
            code, accepted = "unsupported_content_encoding", {"Accept-Encoding": "identity"}
            raise OpenAIError(415, message, code=code, headers=accepted)
        if request.content_length is not None and request.content_length > self.limit:
            raise self._too_large(request.content_length)
        # Bounded: a body stalled or trickled in forever held one of the gateway's places (16 such connections
        # refused every other POST with 429 for as long as they stayed open). A gap of the timeout ends it, and so
        # does falling behind --http-min-body-rate after the timeout's grace; not a fixed time for any size: a body
        # near the limit would need 12 Mbit/s to arrive within the 60 s default.
        timeout, rate = self.config.http_body_timeout_s, self.config.http_min_body_rate
        try:
            return await _Progress(lambda: request.content.total_bytes, timeout, rate).wait(read())
        except _StalledError as stalled:
            self.metrics.cut_off.labels("http", "body", stalled.reason).inc()
            message = (
                f"the body arrived slower than {rate:g} bytes/s after its first {timeout:g} s"
                if stalled.slow
                else f"no bytes of the body arrived for {timeout:g} s"
            )
            raise OpenAIError(408, message, code="timeout") from None
        except web.HTTPRequestEntityTooLarge as exc:
            # aiohttp raises the same error for a form of more than FORM_FIELDS parts; only its text tells them apart.
            if (exc.text or "").startswith("Maximum number of form fields"):
                raise OpenAIError(400, f"the form has more than the {FORM_FIELDS} fields a form may have") from None
            raise self._too_large(None) from None
        except LookupError as exc:
            if type(exc) is not LookupError:  # KeyError, IndexError: not a codec's
                raise
            # post() decodes a text part with the charset its Content-Type names; Python has no such codec.
            message = f"a text part of the form names a charset not known here ({cut(str(exc))}); send text as UTF-8"
            raise OpenAIError(400, message, code="invalid_body") from None
        except (ValueError, RuntimeError, AssertionError, HttpProcessingError) as exc:  # aiohttp's multipart parser
            why = reason(exc) if isinstance(exc, HttpProcessingError) else str(exc)  # the former quote the bytes
            raise OpenAIError(400, f"the body does not parse: {why}", code="invalid_body") from None

    def _too_large(self, size: int | None) -> OpenAIError:
        stated = f"{size} bytes, " if size is not None else ""  # without a Content-Length: cut off at the limit
        return OpenAIError(413, f"the body is {stated}over the limit of {self.limit} bytes", code="request_too_large")

    # Calling the service

    @property
    def _stub(self) -> pb_grpc.OmniGen2Stub:
        assert self.stub is not None, "start() first"
        return self.stub

    def _metadata(self, request: web.Request) -> tuple[tuple[str, str], ...]:
        metadata = [(request_id.HEADER, request[_REQUEST_ID])]
        authorization = request.headers.get("Authorization")
        if authorization is not None:
            if not (authorization.isascii() and authorization.isprintable()):
                raise OpenAIError(401, "the Authorization header is not a bearer token", "authentication_error")
            metadata.append(("authorization", authorization))
        return tuple(metadata)

    def _authenticate(self, request: web.Request) -> None:
        """A missing or unknown bearer token is refused before the body is read, as the service would refuse it."""
        if self.tokens is not None and self.tokens.identify(self._metadata(request)) is None:
            raise OpenAIError(
                401,
                "a valid bearer token is required (Authorization: Bearer <token>)",
                "authentication_error",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    async def _unary(self, request: web.Request, method: Any, message: Any, names: Names) -> Any:
        try:
            return await method(message, metadata=self._metadata(request))
        except grpc.RpcError as error:
            raise from_rpc(error, names.param, self.config.retry_after_s) from None

    async def _off_loop(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Parsing, decoding and base64 of bodies of many megabytes run on a worker thread, not the event loop."""
        return await asyncio.get_running_loop().run_in_executor(None, functools.partial(function, *args, **kwargs))

    # Every request: an id, the OpenAI error shape, one access-log line, the metrics

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        start = time.perf_counter()
        request[_REQUEST_ID] = request_id.from_metadata([(request_id.HEADER, request.headers.get("x-request-id", ""))])
        response: web.StreamResponse | None = None
        try:
            local = request.transport.get_extra_info("sockname") if request.transport is not None else None
            refusal = self.guard.refusal(request.headers.get("Origin"), request.headers.get("Host"), local and local[0])
            if refusal is not None:
                raise refusal
            self._authenticate(request)
            if request.method != "POST":
                response = await self._answer(request, handler)
            elif self.bodies.locked():
                retry = str(max(1, math.ceil(self.config.retry_after_s)))
                message = f"{self.config.max_in_flight} requests in flight here, the limit; retry later"
                raise OpenAIError(
                    429, message, "rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": retry}
                )
            else:
                async with self.bodies:
                    response = await self._answer(request, handler)
        except OpenAIError as exc:
            response = _error_response(exc)
        except web.HTTPException as exc:  # no such route, method not allowed, ...
            allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else {}  # a 405's, RFC 9110 requires
            code = exc.reason.lower().replace(" ", "_")
            response = _error_response(OpenAIError(exc.status, exc.reason, code=code, headers=allow))
        except asyncio.CancelledError:
            # Cut by stop() at the end of its grace period, not by the caller: logged as the server's failure
            # (the error a stream sent, else 503; a stream's status line may have said 200).
            if self.cut_at is not None and time.monotonic() >= self.cut_at:
                request[_STATUS] = request.get(_STATUS) or 503
            elif not request.get(_DELIVERED):
                request[_STATUS] = 499  # the caller went away; the gRPC call (and the work) is cancelled
            raise
        except ConnectionResetError:  # the same, seen by a write before aiohttp cancelled the handler
            if not request.get(_DELIVERED):
                request[_STATUS] = 499
            response = _error_response(OpenAIError(499, "the caller went away", code="cancelled"))
        except Exception:
            log.exception("%s %s failed (request_id=%s)", request.method, request.path, request[_REQUEST_ID])
            failure = OpenAIError(500, "internal error; the server log has the details", "server_error")
            response = _error_response(failure)
        finally:
            route = request.match_info.route.resource
            path = route.canonical if route is not None else "unmatched"
            status = request.get(_STATUS) or (response.status if response is not None else 499)
            seconds = time.perf_counter() - start
            self.metrics.http_requests.labels(request.method, path, str(status)).inc()
            access_log.record_http(request.method, path, request.remote or "-", status, seconds, request[_REQUEST_ID])
        return response

    async def _answer(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """The handler's answer, sent here (a streamed one is already): within the write timeout, and while the
        request still holds its place in the gateway."""
        response = await handler(request)
        await self._write(request, _send(request, response))
        return response

    @staticmethod
    async def _add_request_id(request: web.Request, response: web.StreamResponse) -> None:
        if _REQUEST_ID in request:
            response.headers[request_id.HEADER] = request[_REQUEST_ID]


class _StalledError(TimeoutError):
    """A transfer that stopped (`slow` False) or fell behind its least rate (`slow` True)."""

    def __init__(self, slow: bool) -> None:
        self.slow = slow
        super().__init__(self.reason)

    @property
    def reason(self) -> str:
        """The cut_off metric's reason label."""
        return "slow" if self.slow else "stalled"


class _Progress:
    """A transfer (a body; an answer, over all its writes) judged by its progress, not by how long all of it takes:
    it fails once `position` (bytes moved) has not gone up for `timeout_s`, or once it falls behind `min_rate` over
    the time spent in wait() past a grace of `timeout_s` (pace.py)."""

    def __init__(self, position: Callable[[], int], timeout_s: float, min_rate: float) -> None:
        self.position = position
        self.timeout_s = timeout_s
        self.pace = Pace(timeout_s, min_rate)

    async def wait(self, work: Awaitable[T]) -> T:
        """`work`'s result, or _StalledError (the work cancelled); looked at every quarter of the timeout."""
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(work)
        last, moved_at = self.position(), loop.time()
        try:
            with self.pace.waiting():
                while not (await asyncio.wait({task}, timeout=self.timeout_s / 4))[0]:
                    now, at = loop.time(), self.position()
                    if at > last:
                        moved_at = now
                    if now - moved_at >= self.timeout_s:
                        raise _StalledError(slow=False)
                    if self.pace.spare(at) < 0:
                        raise _StalledError(slow=True)
                    last = at
                return task.result()
        finally:
            task.cancel()  # a no-op once it is done


def _taken(request: web.Request) -> int:
    """The answer's bytes the caller's connection has taken: aiohttp writes straight to the transport, and its
    buffer shrinks as the caller reads (TLS included: its buffer holds what the socket has not taken)."""
    transport = request.transport
    unsent = transport.get_write_buffer_size() if transport is not None else 0
    return request.writer.output_size - unsent


async def _send(request: web.Request, response: web.StreamResponse) -> None:
    await response.prepare(request)
    await response.write_eof()


def _error_response(error: OpenAIError) -> web.Response:
    return web.json_response(error.body(), status=error.status, headers=error.headers)


def _parse_json(raw: bytes) -> Any:
    """json.loads, once the body's values are known to be few: json holds the GIL while it parses, on a worker
    thread too, and a body of millions of small values (20 million in 40 MB: 2.7 s) held the event loop that long.
    Counting commas bounds them (and holds the loop about 0.1 s for the largest body)."""
    if raw.count(b",") > MAX_JSON_COMMAS:
        raise OpenAIError(400, f"the body has over {MAX_JSON_COMMAS} commas: more values than any request takes")
    try:
        return json.loads(raw, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise _not_json(str(exc)) from None
    except RecursionError:
        raise _not_json("its arrays and objects nest deeper than any request's") from None
    except UnicodeDecodeError:  # json.loads takes UTF-8, -16 and -32 (told apart by the first bytes)
        raise _not_json("it is not UTF-8 text") from None
    except ValueError as exc:
        if "integer string conversion" in str(exc):  # int() past Python's limit on digits
            raise _not_json(f"it has an integer of over {sys.get_int_max_str_digits()} digits") from None
        raise _not_json(type(exc).__name__) from None


def _no_constant(name: str) -> None:
    raise _not_json(f"{name} is not JSON")


def _not_json(reason: str) -> OpenAIError:
    return OpenAIError(400, f"the body is not valid JSON: {reason}", code="invalid_json")

"""The OpenAI-compatible HTTP API: a gateway in the front end's process that calls the gRPC service.

Each HTTP request becomes one call of the OmniGen2 gRPC service over a Unix socket that only this process can
open, with the caller's `Authorization` header as the call's metadata: authentication, scopes, rate limits,
admission, validation, budgets, metrics and the access log are the gRPC service's, one implementation for both
APIs, and the gateway only translates (serving/frontend/openai_requests.py) and maps statuses
(serving/frontend/openai_errors.py). Two checks come first, so that no body is read for nothing: an unknown bearer
token is refused 401, and past max_in_flight requests with bodies in the gateway, 429. Routes (docs/api.md):

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
from serving.frontend.metrics import Metrics
from serving.frontend.openai_errors import OpenAIError, bad_request, from_rpc
from serving.frontend.openai_requests import (
    MODEL_ID,
    ChatCall,
    ImageCall,
    Names,
    all_withheld_error,
    chat_answer,
    chat_call,
    chat_chunk,
    image_answer,
    image_call,
    image_event,
    image_usage,
    withheld_event,
)

log = logging.getLogger("omnigen2.http")
T = TypeVar("T")
MiB = 1024 * 1024
_REQUEST_ID = "omnigen2_request_id"  # the request's key for its id
# The most parts an edits form may have: its fields, cfg_range's two values and five images fit many times over.
FORM_FIELDS = 100
# The slowest upload taken (bytes/s, about 0.5 Mbit/s, on average once --http-body-timeout-s has passed): a
# slow steady sender is taken however large its body, a trickle is not.
MIN_BODY_RATE = 64 * 1024
_NO_NAMES = Names()


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
        )
        self.channel: grpc.aio.Channel | None = None
        self.stub: pb_grpc.OmniGen2Stub | None = None

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
        context = None
        if self.config.tls_cert:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(self.config.tls_cert, self.config.tls_key)
        site = web.TCPSite(self.runner, host.strip("[]"), int(port), ssl_context=context)
        await site.start()
        return int(self.runner.addresses[0][1])

    async def stop(self) -> None:
        """Stops listening, then gives requests in flight the grace period to finish."""
        await self.runner.cleanup()
        if self.channel is not None:
            await self.channel.close()

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
        call = await self._off_loop(chat_call, body)

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
            raise from_rpc(error, names.param) from None
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
            failure = from_rpc(error, names.param)
            request["status"] = failure.status
            body = failure.body()
            await send(error_event, {"type": error_event, **body} if error_event else body)
        if done:
            await self._write(request, response.write(b"data: [DONE]\n\n"))
        await self._write(request, response.write_eof())
        return response

    async def _write(self, request: web.Request, write: Awaitable[None]) -> None:
        """A caller that takes nothing of its answer for --stream-write-timeout-s is cut off (408 in the log and the
        metrics, whatever its call ended with): aiohttp's writes wait for as long as the connection stays open, and
        the request held its place in the gateway, and the answer's bytes, all that time. Judged by progress, not
        by the write's length: an answer of megabytes to a slow but steady reader takes as long as it takes."""
        timeout = self.config.stream_write_timeout_s
        try:
            await _unless_stalled(write, lambda: -_unsent(request), timeout)
        except TimeoutError:
            request["status"] = 408  # not the call's status, when this was the write of its error
            if request.transport is not None:
                request.transport.abort()
            raise OpenAIError(408, f"the caller took nothing for {timeout:g} s", code="timeout") from None

    # Reading requests

    async def _json(self, request: web.Request) -> dict[str, Any]:
        if request.content_type != "application/json":
            raise OpenAIError(415, f"the body must be application/json, got {request.content_type or 'none'}")
        raw = await self._body(request, request.read)
        try:
            body = await self._off_loop(json.loads, raw, parse_constant=_no_constant)
        except (ValueError, RecursionError) as exc:
            raise OpenAIError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None
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
                    name, f"takes one value: send it as `{name}`, not `{key}` (only image and cfg_range are lists)"
                )
            elif name in fields:
                raise bad_request(name, "given more than once")
            else:
                fields[name] = value
        return fields, images

    async def _body(self, request: web.Request, read: Callable[[], Awaitable[T]]) -> T:
        """Refuses a body over the limit by its Content-Length before reading it; one that states none is cut off
        as it passes the limit."""
        if request.content_length is not None and request.content_length > self.limit:
            raise self._too_large(request.content_length)
        # Bounded: a body stalled or trickled in forever held one of the gateway's places (16 such connections
        # refused every other POST with 429 for as long as they stayed open). A gap of the timeout ends it, and so
        # does falling behind MIN_BODY_RATE after the timeout's grace; not a fixed time for any size: a body near
        # the limit would need 12 Mbit/s to arrive within the 60 s default.
        timeout = self.config.http_body_timeout_s
        try:
            return await _unless_stalled(read(), lambda: request.content.total_bytes, timeout, MIN_BODY_RATE)
        except _StalledError as stalled:
            message = (
                f"the body arrived slower than {MIN_BODY_RATE // 1024} KiB/s after its first {timeout:g} s"
                if stalled.slow
                else f"no bytes of the body arrived for {timeout:g} s"
            )
            raise OpenAIError(408, message, code="timeout") from None
        except web.HTTPRequestEntityTooLarge as exc:
            # aiohttp raises the same error for a form of more than FORM_FIELDS parts; only its text tells them apart.
            if (exc.text or "").startswith("Maximum number of form fields"):
                raise OpenAIError(400, f"the form has more than the {FORM_FIELDS} fields a form may have") from None
            raise self._too_large(None) from None
        except (ValueError, RuntimeError, AssertionError, HttpProcessingError) as exc:  # aiohttp's multipart parser
            raise OpenAIError(400, f"the body does not parse: {exc}", code="invalid_body") from None

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
            raise from_rpc(error, names.param) from None

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
            response = _error_response(OpenAIError(exc.status, exc.reason, code=exc.reason.lower().replace(" ", "_")))
        except asyncio.CancelledError:
            request["status"] = 499  # the caller went away; the gRPC call (and the work) is cancelled
            raise
        except ConnectionResetError:  # the same, seen by a write before aiohttp cancelled the handler
            request["status"] = 499
            response = _error_response(OpenAIError(499, "the caller went away", code="cancelled"))
        except Exception:
            log.exception("%s %s failed (request_id=%s)", request.method, request.path, request[_REQUEST_ID])
            failure = OpenAIError(500, "internal error; the server log has the details", "server_error")
            response = _error_response(failure)
        finally:
            route = request.match_info.route.resource
            path = route.canonical if route is not None else "unmatched"
            status = request.get("status") or (response.status if response is not None else 499)
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
    def __init__(self, slow: bool) -> None:
        super().__init__("too slow" if slow else "stalled")
        self.slow = slow


async def _unless_stalled(
    work: Awaitable[T], position: Callable[[], int], timeout_s: float, min_rate: float = 0.0
) -> T:
    """`work`'s result, or _StalledError (the work cancelled) once `position` has not gone up for `timeout_s`, or, with
    `min_rate`, once it is below `min_rate` x the time since the first `timeout_s` (a grace for a slow start);
    looked at every quarter of `timeout_s`. A transfer is judged by its progress, not by how long all of it takes."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(work)
    last = position()
    started = moved_at = loop.time()
    try:
        while not (await asyncio.wait({task}, timeout=timeout_s / 4))[0]:
            now, at = loop.time(), position()
            if at > last:
                moved_at = now
            if now - moved_at >= timeout_s:
                raise _StalledError(slow=False)
            if min_rate and at < (now - started - timeout_s) * min_rate:
                raise _StalledError(slow=True)
            last = at
        return task.result()
    finally:
        task.cancel()  # a no-op once it is done


def _unsent(request: web.Request) -> int:
    """The answer's bytes not yet taken by the caller's connection: aiohttp writes straight to the transport, whose
    buffer shrinks as the caller reads (TLS included: its buffer holds what the socket has not taken)."""
    transport = request.transport
    return transport.get_write_buffer_size() if transport is not None else 0


async def _send(request: web.Request, response: web.StreamResponse) -> None:
    await response.prepare(request)
    await response.write_eof()


def _error_response(error: OpenAIError) -> web.Response:
    return web.json_response(error.body(), status=error.status, headers=error.headers)


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")

"""The OmniGen2 gRPC service: admission, validation, one Triton stream per call, encoding, metrics, access log."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator

import grpc
from google.protobuf.message import Message
from omnigen2.v1 import omnigen2_pb2 as pb
from omnigen2.v1 import omnigen2_pb2_grpc as pb_grpc

from serving.frontend import access_log
from serving.frontend.auth import TokenRegistry
from serving.frontend.budgets import check_budgets
from serving.frontend.config import FrontendConfig
from serving.frontend.convert import (
    Forward,
    api_limits,
    chat_result,
    check_request_size,
    encode_images,
    request_defaults,
    served_sequence_length,
    tensor,
    to_chat_forward,
    to_forward,
    understand_defaults,
    understand_limits,
)
from serving.frontend.malformed import Malformed
from serving.frontend.metrics import Metrics
from serving.frontend.status import ApiError, invalid_argument, resource_exhausted
from serving.frontend.triton_backend import ProgressEvent, ResultEvent, TritonBackend

log = logging.getLogger(__name__)
STAGES = ("text_encode", "vae_encode", "denoise", "vae_decode")


class OmniGen2Service(pb_grpc.OmniGen2Servicer):
    def __init__(
        self, config: FrontendConfig, backend: TritonBackend, metrics: Metrics, tokens: TokenRegistry | None = None
    ) -> None:
        self.config = config
        self.tokens = tokens
        self.backend = backend
        self.metrics = metrics
        self.admitted = 0
        self._model_parameters: dict[str, str] | None = None

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        async with self._call("Generate", context, request):
            events = self._generate(request, context, previews=False)
            async with contextlib.aclosing(events):  # releases the admission slot now, not when collected
                async for event in events:
                    if event.HasField("result"):
                        return event.result
        raise AssertionError("unreachable: a generation ends with a result or an error")

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateEvent]:
        async with self._call("GenerateStream", context, request):
            async for event in self._generate(request, context, previews=request.previews):
                yield event

    async def Understand(
        self, request: pb.UnderstandRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.UnderstandEvent]:
        async with self._call("Understand", context, request):
            start = time.perf_counter()
            with self._admission():
                check_request_size(request, self.config.max_request_bytes)
                forward = await asyncio.to_thread(to_chat_forward, request, self.config.chat_limits)
                events = self.backend.understand(forward, context.time_remaining())
                async with contextlib.aclosing(events):
                    async for payload in events:
                        if payload["type"] == "delta":
                            yield pb.UnderstandEvent(delta=payload["text"])
                        else:
                            seconds = time.perf_counter() - start
                            yield pb.UnderstandEvent(result=chat_result(payload, forward.seed, seconds))

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        async with self._call("GetModelInfo", context, request):
            if self._model_parameters is None:
                self._model_parameters = await self.backend.model_parameters()
            max_sequence_length = served_sequence_length(self._model_parameters, self.config.limits)
            return pb.ModelInfo(
                model="OmniGen2",
                checkpoint_sha256=self._model_parameters.get("checkpoint_sha256", ""),
                backend=self._model_parameters.get("backend", ""),
                limits=api_limits(
                    self.config.limits, self.config.max_request_bytes, self.config.max_in_flight, max_sequence_length
                ),
                defaults=request_defaults(max_sequence_length),
                schedulers=[pb.SCHEDULER_EULER, pb.SCHEDULER_DPMSOLVER],
                output_formats=[pb.IMAGE_FORMAT_PNG, pb.IMAGE_FORMAT_JPEG, pb.IMAGE_FORMAT_WEBP],
                understand_limits=understand_limits(self.config.chat_limits),
                understand_defaults=understand_defaults(),
            )
        raise AssertionError("unreachable")

    @contextlib.asynccontextmanager
    async def _call(self, method: str, context: grpc.aio.ServicerContext, request: Message) -> AsyncIterator[None]:
        """Ends every call with a precise status, counts it and logs it.

        What the log needs from the context is read before the call runs: once a caller has cancelled, grpcio may
        have freed the call, and `context.peer()` there crashed the process (a segfault in cygrpc, seen on
        streaming calls cancelled by the client).
        """
        start = time.perf_counter()
        peer, budget = context.peer(), context.time_remaining()
        policy = self.tokens.identify(context.invocation_metadata()) if self.tokens else None
        code = grpc.StatusCode.OK
        try:
            if isinstance(request, Malformed):
                raise invalid_argument([("request", f"not a valid {method} request: {request.reason}")])
            yield
        except ApiError as exc:
            code = exc.code
            await context.abort_with_status(exc.status)
        except asyncio.CancelledError:
            expired = budget is not None and time.perf_counter() - start >= budget
            code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
            raise
        except Exception:
            log.exception("%s failed", method)
            code = grpc.StatusCode.INTERNAL
            await context.abort(code, "internal error; the server log has the details")
        finally:
            seconds = time.perf_counter() - start
            self.metrics.requests.labels(method, code.name).inc()
            self.metrics.latency.labels(method).observe(seconds)
            access_log.record(method, peer, policy.name if policy else "-", code.name, seconds, request)

    async def _generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext, previews: bool
    ) -> AsyncGenerator[pb.GenerateEvent, None]:
        start = time.perf_counter()
        with self._admission():
            check_request_size(request, self.config.max_request_bytes)
            forward = await asyncio.to_thread(to_forward, request, self.config.limits)
            check_budgets(forward, self.config.max_response_bytes)
            forward = dataclasses.replace(forward, previews=previews)
            last_step = time.perf_counter()
            events = self.backend.generate(forward, context.time_remaining())
            async with contextlib.aclosing(events):
                async for event in events:
                    if isinstance(event, ProgressEvent):
                        now = time.perf_counter()
                        self.metrics.step.observe(now - last_step)
                        last_step = now
                        yield pb.GenerateEvent(progress=await self._progress(event))
                    elif isinstance(event, ResultEvent):
                        yield pb.GenerateEvent(result=await self._result(event, forward, start))

    @contextlib.contextmanager
    def _admission(self) -> Iterator[None]:
        if self.admitted >= self.config.max_in_flight:
            raise resource_exhausted(
                f"{self.admitted} requests in flight, the limit is {self.config.max_in_flight}; retry later",
                self.config.retry_after_s,
            )
        self.admitted += 1
        self.metrics.in_flight.set(self.admitted)
        try:
            yield
        finally:
            self.admitted -= 1
            self.metrics.in_flight.set(self.admitted)

    async def _progress(self, event: ProgressEvent) -> pb.Progress:
        progress = pb.Progress(step=event.step, total_steps=event.total)
        if event.preview is not None:
            (preview,) = await asyncio.to_thread(encode_images, event.preview[:1], "PNG", 100)
            progress.preview.CopyFrom(preview)
        return progress

    async def _result(self, event: ResultEvent, forward: Forward, start: float) -> pb.GenerateResponse:
        images = await asyncio.to_thread(encode_images, event.images, forward.output_format, forward.quality)
        total = time.perf_counter() - start
        stages = {name: float(event.timings.get(name, 0.0)) for name in STAGES}
        timings = pb.StageTimings(total=total, queue=max(0.0, total - sum(stages.values())), **stages)
        response = pb.GenerateResponse(
            images=images,
            seed=event.seed,
            timings=timings,
            truncated_prompt_tokens=event.truncated_prompt_tokens,
            truncated_negative_prompt_tokens=event.truncated_negative_prompt_tokens,
        )
        if forward.return_latents:
            response.latents.CopyFrom(tensor(event.latents))
        self.metrics.images.inc(len(images))
        return response

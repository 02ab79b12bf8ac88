"""The OmniGen2 gRPC service: admission, validation, one Triton stream per call, encoding, metrics, access log."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message
from omnigen2.v1 import omnigen2_pb2 as pb
from omnigen2.v1 import omnigen2_pb2_grpc as pb_grpc

from serving.frontend import access_log, cancel_clock, request_id
from serving.frontend.admission import Admission, Load
from serving.frontend.auth import TokenRegistry
from serving.frontend.budgets import check_budgets, check_chat_budgets, generation_load, inflight_budgets
from serving.frontend.config import FrontendConfig
from serving.frontend.convert import (
    API_STEP_CACHES,
    Forward,
    chat_result,
    check_counts,
    encode_images,
    tensor,
    to_chat_forward,
    to_forward,
)
from serving.frontend.malformed import Malformed
from serving.frontend.metrics import Metrics
from serving.frontend.model_info import (
    api_budgets,
    api_limits,
    request_defaults,
    served_safety,
    served_sequence_length,
    served_step_caches,
    understand_defaults,
    understand_limits,
)
from serving.frontend.outbox import CutOffError, Outbox
from serving.frontend.policy import AnswerScan, PolicyFile, PromptPolicy, Violation
from serving.frontend.request_size import check_request_size
from serving.frontend.status import ApiError, invalid_argument
from serving.frontend.triton_backend import ProgressEvent, ResultEvent, TritonBackend
from serving.pipeline.request import CacheKind
from serving.triton.memory import IdleTrimmer

# What this front end's GenerateUsage knows: a newer BLS's further counts are left out, not an error.
USAGE_FIELDS = frozenset(pb.GenerateUsage.DESCRIPTOR.fields_by_name)
log = logging.getLogger(__name__)
STAGES = ("text_encode", "vae_encode", "denoise", "vae_decode", "safety")
T = TypeVar("T")


class OmniGen2Service(pb_grpc.OmniGen2Servicer):
    def __init__(
        self,
        config: FrontendConfig,
        backend: TritonBackend,
        metrics: Metrics,
        tokens: TokenRegistry | None = None,
        prompt_policy: PolicyFile | None = None,
    ) -> None:
        self.config = config
        self.tokens = tokens
        self.prompt_policy = prompt_policy
        self.backend = backend
        self.metrics = metrics
        self.admission = Admission(
            config.max_in_flight,
            inflight_budgets(config),
            config.retry_after_s,
            metrics,
        )
        # Header checks and encoding run here, never on the event loop and never more at once than this.
        self.workers = ThreadPoolExecutor(config.worker_threads, thread_name_prefix="frontend-worker")
        # Parsing, sizing and describing large requests: protobuf holds the GIL throughout (70-120 ms per 100 MiB),
        # so one thread does it as fast as more would, and more took the GIL from the event loop more often (a
        # health probe waited 1.7 s instead of 0.9 s while 8 x 100 MiB uploads were read).
        self.readers = ThreadPoolExecutor(1, thread_name_prefix="frontend-reader")
        # The prompt policy's checks, requests' and streamed answers' (0.1 s a delta at 100 rules): on the workers,
        # an answer's tokens waited behind a large result's PNG encodes (seconds).
        self.checkers = ThreadPoolExecutor(2, thread_name_prefix="frontend-policy")
        # glibc kept what large answers freed (idle +435 MB after one 8 x 4096x4096 answer, +847 after two).
        self.trimmer = IdleTrimmer()
        self._model_parameters: dict[str, str] | None = None
        self.server_id = config.server_id  # the front end names it once it has bound its port
        self.cut_at: float | None = None  # set by the server's stop: calls still running then are cut (UNAVAILABLE)
        self._statuses: set[asyncio.Future[None]] = set()  # cut-off calls' statuses waiting on their callers
        # Every call's handler task while it runs (cut by the drain, cancelled by its caller, or still reading its
        # request): the stop waits for all of them after the cut.
        self.running: set[asyncio.Task[Any]] = set()
        self.cut_by_drain: list[str] = []  # request ids of the calls the stop's grace period cut

    def record_cut(self, method: str, call_id: str) -> None:
        """A call the stop's grace period cut (UNAVAILABLE): counted, and named by the stop's warning."""
        self.metrics.drain_cut_calls.labels(method).inc()
        self.cut_by_drain.append(call_id)

    async def ended(self, timeout_s: float) -> int:
        """Waits up to `timeout_s` for the handlers still running (cut calls waiting on their model's stop, then
        recording themselves); how many were still running then."""
        if self.running:
            await asyncio.wait(set(self.running), timeout=timeout_s)
        return len(self.running)

    def close(self) -> None:
        """Ends the pools' threads once the calls have: an idle one at once, a busy one after its task (queued tasks
        are dropped). Not waited for, so that a stuck task cannot hang the stop; an embedded front end, started and
        stopped many times in one process, leaves no pool threads behind. The trimmer's thread is waited for, a
        second at most (a trim in progress): the server's stop runs this off its event loop."""
        for pool in (self.workers, self.readers, self.checkers):
            pool.shutdown(wait=False, cancel_futures=True)
        self.trimmer.close()

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
        """Writes its reply itself (the read gate serves it as a streamed response, reading.py), with its slot and
        budgets held: a returned reply (up to --max-response-bytes) waited on its caller after they were given back,
        and callers that never read theirs each held one. The write is timed as a stream's are."""
        async with self._call("Generate", context, request):
            outbox = self._outbox()
            events = self._generate(request, context, previews=False)
            async with contextlib.aclosing(events):  # releases the admission slot now, not when collected
                async for event in events:
                    if event.HasField("result"):
                        await outbox.write(context, event.result)
                        return
            raise AssertionError("unreachable: a generation ends with a result or an error")

    async def GenerateStream(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
        async with self._call("GenerateStream", context, request):
            outbox = self._outbox()
            events = self._generate(request, context, previews=request.previews, outbox=outbox)
            async with contextlib.aclosing(events):
                async for event in events:
                    await outbox.write(context, event)

    async def Understand(self, request: pb.UnderstandRequest, context: grpc.aio.ServicerContext) -> None:
        async with self._call("Understand", context, request):
            start = time.perf_counter()
            token = self._token_name(context)
            scan = AnswerScan()
            with self.admission.slot():
                await self._off_loop(check_request_size, request, self.config.max_request_bytes, executor=self.readers)
                forward = await self._off_loop(to_chat_forward, request, self.config.chat_limits)
                check_chat_budgets(forward, self.config)
                with self.admission.reserve(Load(pixels=forward.input_pixels, chat_tokens=forward.cost.total_tokens)):
                    outbox = self._outbox()
                    events = self.backend.understand(forward, self._run_time(context), outbox)
                    async with contextlib.aclosing(events):
                        async for payload in events:
                            if payload["type"] == "delta":
                                # The delta with the answer's last ANSWER_WINDOW characters: a term may straddle
                                # deltas, and re-reading the whole answer each time would be quadratic. The delta
                                # that completes a match is not sent; the stream ends with the rule's id instead.
                                await self._check_answer(payload["text"], token, scan)
                                await outbox.write(context, pb.UnderstandEvent(delta=payload["text"]))
                            else:
                                seconds = time.perf_counter() - start
                                result = chat_result(payload, forward.seed, seconds)
                                await self._check_answer(result.text, token)
                                await outbox.write(context, pb.UnderstandEvent(result=result))

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
                step_caches=served_step_caches(self._model_parameters),
                safety=served_safety(self._model_parameters, self.prompt_policy is not None),
                output_formats=[pb.IMAGE_FORMAT_PNG, pb.IMAGE_FORMAT_JPEG, pb.IMAGE_FORMAT_WEBP],
                understand_limits=understand_limits(self.config.chat_limits),
                understand_defaults=understand_defaults(),
                budgets=api_budgets(self.config),
            )
        raise AssertionError("unreachable")

    @contextlib.asynccontextmanager
    async def _call(self, method: str, context: grpc.aio.ServicerContext, request: Message) -> AsyncIterator[None]:
        with self.trimmer:  # what calls freed goes back to the system once they stop (serving/triton/memory.py)
            async with self._counted(method, context, request):
                yield

    @contextlib.asynccontextmanager
    async def _counted(self, method: str, context: grpc.aio.ServicerContext, request: Message) -> AsyncIterator[None]:
        """Ends every call with a precise status, counts it and logs it.

        What the log needs from the context is read before the call runs: once a caller has cancelled, grpcio may
        have freed the call, and `context.peer()` there crashed the process (a segfault in cygrpc, seen on
        streaming calls cancelled by the client).
        """
        start, began = time.perf_counter(), time.monotonic()
        handler = asyncio.current_task()
        assert handler is not None  # grpc.aio runs each handler in a task
        peer, budget = context.peer(), context.time_remaining()
        policy = self.tokens.identify(context.invocation_metadata()) if self.tokens else None
        call_id = request_id.from_metadata(context.invocation_metadata())
        token, clock = request_id.begin(call_id), cancel_clock.begin()
        code = grpc.StatusCode.OK
        described = ""
        self.running.add(handler)
        try:
            await context.send_initial_metadata(((request_id.HEADER, call_id), (request_id.SERVED_BY, self.server_id)))
            if isinstance(request, Malformed):
                raise invalid_argument([("request", f"not a valid {method} request: {request.reason}")])
            described = await self._describe(request)
            # Cheap counts first: the policy and the validation walk every message.
            check_counts(request, self.config.limits, self.config.chat_limits)
            await self._check_request(request, policy.name if policy else None)  # before admission: no model time
            yield
        except CutOffError as exc:
            code = exc.code
            await self._end_behind_writes(context, exc.status, self._keep_unsent(exc.unsent))
        except ApiError as exc:
            code = exc.code
            await context.abort_with_status(exc.status)
        except asyncio.CancelledError:
            # Whichever came first, the caller's cancel, its deadline or the server's stop, is the status it saw:
            # judged when the call was cancelled, not when it ended (the model's stop may come after the deadline).
            code = cancel_clock.status(cancel_clock.cancelled_at() or time.monotonic(), began, budget, self.cut_at)
            if code is grpc.StatusCode.UNAVAILABLE:
                self.record_cut(method, call_id)
            raise
        except Exception:
            log.exception("%s failed (request_id=%s)", method, call_id)
            code = grpc.StatusCode.INTERNAL
            await context.abort(code, "internal error; the server log has the details")
        finally:
            seconds = time.perf_counter() - start
            self.metrics.requests.labels(method, code.name).inc()
            self.metrics.latency.labels(method, code.name).observe(seconds)
            access_log.record(method, peer, policy.name if policy else "-", code.name, seconds, described, call_id)
            cancel_clock.end(clock)
            request_id.end(token)
            self.running.discard(handler)

    async def _end_behind_writes(
        self, context: grpc.aio.ServicerContext, status: grpc.Status, release: Callable[[], None]
    ) -> None:
        """Ends a call whose caller stopped taking its writes. The status goes out once the caller has taken them,
        or never (the call ends when its connection does): waiting for it kept the handler, its request's bytes
        (reading.py) and its log line until then. The handler returns once grpcio has the status to send (a handler
        returning before that had OK sent), and grpcio ends the call as aborted. `release` is called once gRPC has
        let go of the call (the status sent, or the call ended with its connection), and its last message with it."""
        sending = asyncio.ensure_future(context.abort_with_status(status))
        self._statuses.add(sending)

        def sent(task: asyncio.Future[None]) -> None:
            self._statuses.discard(task)
            release()
            if not task.cancelled():
                task.exception()  # retrieved: AbortError once sent, ExecuteBatchError if the caller left first

        sending.add_done_callback(sent)
        while not (context.done() or sending.done()):  # done(): the status is grpcio's to send
            await asyncio.sleep(0)

    def _keep_unsent(self, message: Message | None) -> Callable[[], None]:
        """A cut call's last message stays queued in gRPC core until its status goes out (grpc.aio cannot reset one
        stream): its images' pixels stay held against --max-inflight-output-pixels, else callers that never read
        left a reply each (up to --max-response-bytes) every --stream-write-timeout-s. It is all gRPC keeps of the
        call: a write returns once its message is in the socket's buffers (tests/test_cut_stream.py). Nothing awaits
        between the call's reservation ending and this, so the budget is never seen free in between."""
        nbytes = message.ByteSize() if message is not None else 0
        release = self.admission.keep(Load(output_pixels=_image_pixels(message)))
        self.metrics.cut_replies.inc(nbytes)

        def released() -> None:
            release()
            self.metrics.cut_replies.dec(nbytes)

        return released

    async def _describe(self, request: Message) -> str:
        """The access log's shapes and sizes, off the loop where it reads image bytes: each read of a bytes field
        copies it (60 ms for 100 MiB: 8 uploads' copies kept a health probe waiting over a second)."""
        images = isinstance(request, pb.GenerateRequest) and len(request.input_images) > 0
        if images or isinstance(request, pb.UnderstandRequest):
            return await self._off_loop(access_log.describe, request, executor=self.readers)
        return access_log.describe(request)

    def _token_name(self, context: grpc.aio.ServicerContext) -> str | None:
        policy = self.tokens.identify(context.invocation_metadata()) if self.tokens else None
        return policy.name if policy else None

    async def _check_request(self, request: Message, token: str | None) -> None:
        if self.prompt_policy is None:
            return
        # Off the loop: regular expressions read a long prompt several ways (0.25 s for 2 x 8190 characters at 100
        # rules), and health checks and every other call waited for it there.
        check = self.prompt_policy.policy.check_request
        violation = await self._off_loop(check, request, token, executor=self.checkers)
        if violation is not None:
            self.metrics.policy_blocked.labels(violation.rule, "request").inc()
            raise violation.error()

    async def _check_answer(self, answer: str, token: str | None, scan: AnswerScan | None = None) -> None:
        """`answer` whole, or with `scan` a streamed delta in its window. Off the loop, as the request's check: a
        window of letter pairs and zero-width spaces took 0.1 s at 100 regex rules, once per delta, and a streamed
        answer held the loop for up to 0.95 s at a time."""
        if self.prompt_policy is None:
            return
        policy = self.prompt_policy.policy
        violation = await self._off_loop(_answer_violation, policy, answer, token, scan, executor=self.checkers)
        if violation is not None:
            self.metrics.policy_blocked.labels(violation.rule, "answer").inc()
            raise violation.error("answer")

    async def _generate(
        self,
        request: pb.GenerateRequest,
        context: grpc.aio.ServicerContext,
        previews: bool,
        outbox: Outbox | None = None,
    ) -> AsyncGenerator[pb.GenerateEvent, None]:
        """The admission slot and reservation are held until the BLS has stopped, however the call ends: closing
        the Triton stream's generator waits for that (serving/frontend/triton_call.py)."""
        start = time.perf_counter()
        with self.admission.slot():
            # Off the loop: sizing a message of millions of fields took seconds, and health waited with it.
            await self._off_loop(check_request_size, request, self.config.max_request_bytes, executor=self.readers)
            forward = await self._off_loop(to_forward, request, self.config.limits)
            check_budgets(forward, self.config)
            forward = dataclasses.replace(forward, previews=previews)
            last_step = time.perf_counter()
            with self.admission.reserve(generation_load(forward)):
                events = self.backend.generate(forward, self._run_time(context), outbox)
                async with contextlib.aclosing(events):
                    async for event in events:
                        if isinstance(event, ProgressEvent):
                            now = time.perf_counter()
                            self.metrics.step.observe(now - last_step)
                            last_step = now
                            yield pb.GenerateEvent(progress=await self._progress(event))
                        elif isinstance(event, ResultEvent):
                            yield pb.GenerateEvent(result=await self._result(event, forward, start))

    def _outbox(self) -> Outbox:
        """A streaming caller that stops reading would hold its slot, and its output would pile up, for as long as
        it liked: a stalled or too slow write, or too much output waiting behind it, ends the call (and so the
        work)."""
        config = self.config
        cut_off = self.metrics.cut_off
        return Outbox(
            config.max_buffered_stream_bytes,
            config.stream_write_timeout_s,
            config.stream_min_write_rate,
            lambda reason: cut_off.labels("grpc", "answer", reason).inc(),
        )

    def _run_time(self, context: grpc.aio.ServicerContext) -> float:
        """The caller's deadline or the server's maximum run time, whichever comes first."""
        remaining = context.time_remaining()
        return self.config.max_run_s if remaining is None else min(remaining, self.config.max_run_s)

    async def _off_loop(self, function: Callable[..., T], *args: Any, executor: Executor | None = None) -> T:
        call = functools.partial(function, *args)
        return await asyncio.get_running_loop().run_in_executor(executor or self.workers, call)

    async def _progress(self, event: ProgressEvent) -> pb.Progress:
        progress = pb.Progress(step=event.step, total_steps=event.total, preview_withheld=event.preview_withheld)
        if event.preview is not None:
            (preview,) = await self._off_loop(encode_images, event.preview[:1], "PNG", 100)
            progress.preview.CopyFrom(preview)
        return progress

    async def _result(self, event: ResultEvent, forward: Forward, start: float) -> pb.GenerateResponse:
        withheld = {entry["index"] for entry in event.withheld}
        kept = [i for i in range(len(event.images)) if i not in withheld]
        images = await self._off_loop(encode_images, event.images[kept], forward.output_format, forward.quality)
        total = time.perf_counter() - start
        stages = {name: float(event.timings.get(name, 0.0)) for name in STAGES}
        timings = pb.StageTimings(total=total, queue=max(0.0, total - sum(stages.values())), **stages)
        response = pb.GenerateResponse(
            images=images,
            seed=event.seed,
            timings=timings,
            truncated_prompt_tokens=event.truncated_prompt_tokens,
            truncated_negative_prompt_tokens=event.truncated_negative_prompt_tokens,
            cache=API_STEP_CACHES[CacheKind(event.cache)],
            cache_note=event.cache_note,
            usage=pb.GenerateUsage(**{k: v for k, v in event.usage.items() if k in USAGE_FIELDS}),
            withheld=[
                pb.WithheldImage(index=entry["index"], findings=[pb.SafetyFinding(**f) for f in entry["findings"]])
                for entry in event.withheld
            ],
        )
        self.metrics.images_withheld.inc(len(withheld))
        if forward.return_latents:
            response.latents.CopyFrom(tensor(event.latents))
        self.metrics.images.inc(len(images))
        return response


def _image_pixels(message: Message | None) -> int:
    """Pixels of the images in a Generate reply or event (a result's or a preview)."""
    if isinstance(message, pb.GenerateEvent):
        message = message.result if message.HasField("result") else message.progress
    if isinstance(message, pb.GenerateResponse):
        return sum(image.width * image.height for image in message.images)
    if isinstance(message, pb.Progress) and message.HasField("preview"):
        return message.preview.width * message.preview.height
    return 0


def _answer_violation(policy: PromptPolicy, text: str, token: str | None, scan: AnswerScan | None) -> Violation | None:
    """The scan's window moves on the worker too: it normalises the text, and the deltas of one answer come in turn."""
    return policy.check([("answer", scan.window(text) if scan else text)], token)

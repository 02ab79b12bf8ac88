"""The warm-up the front end runs each time Triton turns ready, before its health says SERVING.

Triton says READY once its models are loaded, but their first calls still pay for what a model does once (ONNX
Runtime's and TensorRT's first runs, CUDA context and kernel selection, weights paged in): without a warm-up the
first caller of a new or restarted pod waits for it. Three small requests go through the path real calls take
(the API's validation and defaults, once at start, then the Triton streams): a text-to-image, an edit of one small
generated image (the VAE encoder) and an Understand call with that image (the mllm and its vision encoder). They run
together and bypass the API's admission, access log and request metrics: no caller's slot or budget is spent on them
(nor counted in omnigen2_stop_grace_expired), and each carries a request id starting `warmup-` (Triton's log names
it if it fails).

A warm-up that fails or outlasts its time limit is logged once and health turns SERVING anyway: a replica that
Triton calls ready is likelier to serve than not, and one held NOT_SERVING forever would leave the fleet a pod
short with nothing to restart it (its liveness follows the event loop, not Triton).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable

from omnigen2.v1 import omnigen2_pb2 as pb
from PIL import Image

from serving.errors import SettingError
from serving.frontend import request_id
from serving.frontend.config import FrontendConfig
from serving.frontend.convert import ChatForward, Forward, to_chat_forward, to_forward
from serving.frontend.metrics import WARMUP_OUTCOMES, Metrics
from serving.frontend.status import ApiError
from serving.frontend.triton_backend import TritonBackend

log = logging.getLogger("omnigen2.frontend")
PREFIX = "warmup-"
# Enough to run every step of the mllm's generation loop once past the prompt.
ANSWER_TOKENS = 2


class Warmup:
    def __init__(self, config: FrontendConfig, backend: TritonBackend, metrics: Metrics) -> None:
        self.config = config
        self.backend = backend
        self.metrics = metrics
        self.generate, self.edit, self.understand = warmup_requests(config)

    async def run(self) -> str:
        """One warm-up; its outcome (ok, failed, timeout) is logged and recorded. Cancelled (Triton went away, the
        front end stops): the model calls are stopped, `cancelled` recorded, and the cancellation goes on."""
        timeout_s = self.config.warmup_timeout_s
        start = time.perf_counter()
        run_s = self.config.max_run_s  # bounded by the warm-up's own timeout
        calls = {
            "generate": _drain(self.backend.generate(self.generate, run_s, on_grace_expired=_not_a_caller)),
            "edit": _drain(self.backend.generate(self.edit, run_s, on_grace_expired=_not_a_caller)),
            "understand": _drain(self.backend.understand(self.understand, run_s, on_grace_expired=_not_a_caller)),
        }
        outcome = "cancelled"
        try:
            async with asyncio.timeout(timeout_s):
                results = await asyncio.gather(*(_timed(name, call) for name, call in calls.items()))
            failures = [f"{name} ({error})" for name, error, _ in results if error]
            seconds = time.perf_counter() - start
            timings = ", ".join(f"{name} {took:.2f} s" for name, _, took in results)
            if failures:
                outcome = "failed"
                log.warning(
                    "warm-up failed after %.2f s: %s; health turns SERVING anyway, first callers may be slow",
                    seconds,
                    "; ".join(failures),
                )
            else:
                outcome = "ok"
                log.info("warm-up done in %.2f s (%s)", seconds, timings)
        except asyncio.CancelledError:
            log.info(
                "warm-up stopped after %.2f s: Triton not ready any more, or shutting down", time.perf_counter() - start
            )
            raise
        except TimeoutError:
            outcome = "timeout"
            log.warning(
                "warm-up still running after --warmup-timeout-s=%g s: stopped; health turns SERVING anyway, first "
                "callers may be slow",
                timeout_s,
            )
        finally:
            self._record(outcome, time.perf_counter() - start)
        return outcome

    def _record(self, outcome: str, seconds: float) -> None:
        self.metrics.warmup_seconds.set(seconds)
        self.metrics.warmups.labels(outcome).inc()
        for name in WARMUP_OUTCOMES:
            self.metrics.warmup_outcome.labels(name).set(1 if name == outcome else 0)


def warmup_requests(config: FrontendConfig) -> tuple[Forward, Forward, ChatForward]:
    """The text-to-image, the edit and the Understand call, built and validated as real requests are: a
    --warmup-size or --warmup-steps the API refuses stops the start (`make serve`: before its build, through
    check_settings) rather than failing every warm-up."""
    try:
        # The text-to-image first: a size the API refuses is found before an image of that size is made.
        generate = to_forward(_generation("A blue square", [], config), config.limits)
        # At least SIZE_MULTIPLE px (FLAG_TYPES), which the edit's input image needs.
        image = pb.Image(data=_grey_png(config.warmup_size))
        edit = to_forward(_generation("Make it blue", [image], config), config.limits)
        content = [pb.ContentPart(image=image), pb.ContentPart(text="What colour is this?")]
        message = pb.ChatMessage(role=pb.ROLE_USER, content=content)
        chat = pb.UnderstandRequest(messages=[message], max_new_tokens=ANSWER_TOKENS, seed=0)
        return generate, edit, to_chat_forward(chat, config.chat_limits)
    except ApiError as exc:
        raise SettingError("--warmup-size/--warmup-steps", f"the warm-up's requests are refused: {exc}") from exc


def _generation(prompt: str, images: list[pb.Image], config: FrontendConfig) -> pb.GenerateRequest:
    size = config.warmup_size
    return pb.GenerateRequest(
        prompt=prompt, input_images=images, width=size, height=size, steps=config.warmup_steps, seed=0
    )


async def _drain(events: AsyncGenerator[object, None]) -> None:
    """A call's events read to the end; stopped early, the generator is closed, so its model is asked to stop."""
    async with contextlib.aclosing(events):
        async for _ in events:
            pass


def _not_a_caller() -> None:
    """A warm-up call stopped past --stop-grace-s: omnigen2_stop_grace_expired counts callers' calls only."""


async def _timed(name: str, call: Awaitable[None]) -> tuple[str, str, float]:
    """(name, error or "", seconds) of one warm-up call, under a request id of its own."""
    token = request_id.begin(f"{PREFIX}{name}-{uuid.uuid4().hex[:12]}")
    start = time.perf_counter()
    try:
        await call
        return name, "", time.perf_counter() - start
    except Exception as exc:  # ApiError from the models or the link, or anything unexpected: reported, not raised
        return name, f"{type(exc).__name__}: {exc} (request_id={request_id.current()})", time.perf_counter() - start
    finally:
        request_id.end(token)


def _grey_png(size: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (128, 128, 128)).save(buffer, format="PNG")
    return buffer.getvalue()

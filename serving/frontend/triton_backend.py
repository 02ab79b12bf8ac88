"""The front end's link to Triton: one stream per call (`omnigen2` BLS or `mllm`), readiness, model parameters.

Every failure leaves here as an ApiError with the status the API promises: stream errors carry the BLS's own
code ("CODE: field: detail", serving/triton/wire.py), and transport failures map to UNAVAILABLE, as do the failures
of a model whose stub process died or that is being loaded again (retryable: the watchdog reloads it,
serving/triton/watchdog.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import InferInput, InferResult
from tritonclient.utils import InferenceServerException

from serving.frontend import request_id
from serving.frontend.convert import API_FIELD, ChatForward, Forward
from serving.frontend.status import ApiError, invalid_argument, plain, resource_exhausted
from serving.frontend.triton_call import Buffer, StreamDrains, TritonCall, Unbuffered
from serving.triton.model_names import BLS_MODEL, MLLM_MODEL
from serving.triton.wire import RECONNECT_OPTIONS, WireError

# Triton's Python backend fails the requests of a model whose stub process died with this, until it is reloaded.
DEAD_STUB = re.compile(r"Stub process '[^']*' is not healthy")
# Triton's answer for a model that is between its unload and its load again (the watchdog's reload): a call the front
# end let through before its health poll saw the model go may be retried once it is back.
RELOADING = re.compile(r"Request for unknown model: '[^']*' (has no available versions|version \d+ is not at ready)")


@dataclass(frozen=True)
class ProgressEvent:
    step: int
    total: int
    preview: np.ndarray | None  # uint8 NHWC, when asked for and not withheld
    preview_withheld: bool = False  # the safety classifier kept this step's preview back


@dataclass(frozen=True)
class ResultEvent:
    seed: int
    timings: dict[str, float]
    images: np.ndarray  # uint8 NHWC
    latents: np.ndarray
    truncated_prompt_tokens: int  # cut at max_sequence_length
    truncated_negative_prompt_tokens: int
    withheld: list[dict[str, Any]]  # safety: [{"index", "findings": [{"label", "score", "threshold"}]}]
    cache: str = "none"  # the step caching that ran
    cache_note: str = ""  # why not the one asked for
    usage: dict[str, int] = field(default_factory=dict)  # GenerateUsage's fields; absent from an older BLS


Event = ProgressEvent | ResultEvent


def _api_field(field: str) -> str:
    """The BLS names input images `images[i]`; the API calls them `input_images[i].data`."""
    indexed = re.fullmatch(r"images\[(\d+)\]", field)
    return f"input_images[{indexed.group(1)}].data" if indexed else API_FIELD.get(field, field)


def _stream_error(message: str, retry_after_s: float) -> ApiError:
    error = WireError.parse(message)
    if error.code == "INVALID_ARGUMENT":
        return invalid_argument([(_api_field(error.field or "request"), error.message)])
    if error.code == "RESOURCE_EXHAUSTED":
        return resource_exhausted(error.message, retry_after_s)
    if error.code == "CANCELLED":
        return plain(grpc.StatusCode.CANCELLED, error.message)
    if error.code == "UNAVAILABLE":  # a component's process died under the BLS's call (component_watch.py)
        return plain(grpc.StatusCode.UNAVAILABLE, error.message)
    if DEAD_STUB.search(error.message):  # the BLS's message names the component too
        return plain(
            grpc.StatusCode.UNAVAILABLE,
            f"a model's process died and is being restarted; retry the call: {error.message}",
        )
    if RELOADING.search(error.message):
        return plain(grpc.StatusCode.UNAVAILABLE, f"a model is being loaded again; retry the call: {error.message}")
    return plain(grpc.StatusCode.INTERNAL, f"generation failed: {error.message}")


def transport_error(exc: grpc.RpcError | InferenceServerException) -> ApiError:
    """A failed call to Triton itself (not a model error)."""
    if isinstance(exc, grpc.RpcError):
        code, detail = exc.code(), exc.details()
    else:
        code, detail = _status_code(exc.status()), exc.message()
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return plain(code, "deadline exceeded")
    if code == grpc.StatusCode.CANCELLED:
        return plain(code, "cancelled")
    if code in (grpc.StatusCode.UNAVAILABLE, None):
        return plain(grpc.StatusCode.UNAVAILABLE, f"inference server unavailable: {detail}")
    return plain(grpc.StatusCode.INTERNAL, f"inference server error {code.name}: {detail}")


def _status_code(text: str | None) -> grpc.StatusCode | None:
    """tritonclient reports statuses as 'StatusCode.NAME' strings."""
    name = (text or "").rpartition(".")[2]
    return grpc.StatusCode[name] if name in grpc.StatusCode.__members__ else None


class TritonBackend:
    def __init__(
        self,
        url: str,
        max_message_bytes: int,
        retry_after_s: float,
        stop_grace_s: float = 10.0,
        on_grace_expired: Callable[[], None] = lambda: None,
    ) -> None:
        """`stop_grace_s`: how long a call that ends early waits for its model to confirm the stop (the call's slot
        is held meanwhile); `on_grace_expired` counts the calls that waited that long."""
        self.url = url
        self.retry_after_s = retry_after_s
        self.stop_grace_s = stop_grace_s
        self.on_grace_expired = on_grace_expired
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            *RECONNECT_OPTIONS,
        ]
        self.client = triton_aio.InferenceServerClient(url, channel_args=options)
        self.drains = StreamDrains()
        self.calls: set[TritonCall] = set()  # the calls whose stream is open

    async def close(self) -> None:
        await self.drains.close()
        await self.client.close()

    async def ready(self, timeout_s: float = 2.0) -> bool | None:
        """The server and every model in its repository READY: a component being reloaded (after its stub process
        died, serving/triton/watchdog.py) fails the calls that need it, so health must not say SERVING then.
        False: Triton answered that it or a model is not ready; None: no answer within `timeout_s` (Triton gone, or
        too busy to answer in time)."""
        try:
            server_ready = await self.client.is_server_ready(client_timeout=timeout_s)
            # Asked whatever the server's answer: with a model reloading, Triton says the server is not ready too.
            asked = asyncio.get_running_loop().time()
            index = await self.client.get_model_repository_index(client_timeout=timeout_s)
        except (InferenceServerException, grpc.RpcError):
            return None
        states = {model.name: model.state for model in index.models}
        self._end_calls_of({name for name, state in states.items() if state != "READY"}, asked)
        return (
            server_ready
            and {BLS_MODEL, MLLM_MODEL} <= states.keys()
            and all(state == "READY" for state in states.values())
        )

    def _end_calls_of(self, down: set[str], asked: float) -> None:
        """A model seen not ready is being reloaded by the watchdog after its stub died: the requests the dead stub
        had never end by themselves, so the calls opened before it was seen are ended here."""
        for call in [call for call in self.calls if call.model in down and call.started < asked]:
            call.model_down()

    async def model_parameters(self) -> dict[str, str]:
        """The `omnigen2` config's parameters (spec, checkpoint_sha256, backend, ...)."""
        try:
            config = await self.client.get_model_config(BLS_MODEL, as_json=True, client_timeout=5.0)
        except (InferenceServerException, grpc.RpcError) as exc:
            raise transport_error(exc) from exc
        parameters = config["config"].get("parameters", {})
        return {name: value["string_value"] for name, value in parameters.items()}

    async def _stream(
        self,
        model: str,
        request: bytes,
        images: list[bytes],
        run_s: float,
        buffer: Buffer,
        on_grace_expired: Callable[[], None] | None,
    ) -> AsyncGenerator[tuple[dict[str, Any], InferResult], None]:
        """(event JSON, response) pairs up to the final event; if the caller stops early (an exception, a
        cancelled task, or closing this generator), the model is asked to stop, and this ends once it has.
        `on_grace_expired`: in place of the backend's (which counts callers' calls)."""
        # Triton's own request id: the models log failures with it, as the access log does.
        call = TritonCall(
            self.client,
            model,
            _inputs(request, images),
            request_id.current(),
            lambda message: _stream_error(message, self.retry_after_s),
            transport_error,
            self.drains,
        )
        events = call.responses(run_s, self.stop_grace_s, buffer, on_grace_expired or self.on_grace_expired)
        self.calls.add(call)
        try:
            async with contextlib.aclosing(events):
                async for pair in events:
                    yield pair
        finally:
            self.calls.discard(call)

    async def generate(
        self,
        forward: Forward,
        run_s: float,
        buffer: Buffer | None = None,
        on_grace_expired: Callable[[], None] | None = None,
    ) -> AsyncGenerator[Event, None]:
        """Progress events, then one result, from the `omnigen2` BLS."""
        events = self._stream(
            BLS_MODEL, forward.request_json(), forward.images, run_s, buffer or Unbuffered(), on_grace_expired
        )
        async with contextlib.aclosing(events):
            async for payload, result in events:
                yield _generation_event(payload, result)

    async def understand(
        self,
        forward: ChatForward,
        run_s: float,
        buffer: Buffer | None = None,
        on_grace_expired: Callable[[], None] | None = None,
    ) -> AsyncGenerator[dict[str, Any], None]:
        """`delta` events, then one `done`, from the `mllm` model."""
        events = self._stream(
            MLLM_MODEL, forward.request_json(), forward.images, run_s, buffer or Unbuffered(), on_grace_expired
        )
        async with contextlib.aclosing(events):
            async for payload, _ in events:
                yield payload


def _inputs(request: bytes, images: list[bytes]) -> list[InferInput]:
    tensor = InferInput("request", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([request], dtype=np.object_))
    inputs = [tensor]
    if images:
        encoded = InferInput("images", [len(images)], "BYTES")
        encoded.set_data_from_numpy(np.array(images, dtype=np.object_))
        inputs.append(encoded)
    return inputs


def _generation_event(payload: dict[str, Any], result: InferResult) -> Event:
    if payload["type"] == "progress":
        return ProgressEvent(
            step=payload["step"],
            total=payload["total"],
            preview=result.as_numpy("preview"),
            preview_withheld=payload.get("preview_withheld", False),
        )
    return ResultEvent(
        seed=payload["seed"],
        timings=payload["timings"],
        images=result.as_numpy("images"),
        latents=result.as_numpy("latents"),
        truncated_prompt_tokens=payload["truncated_prompt_tokens"],
        truncated_negative_prompt_tokens=payload["truncated_negative_prompt_tokens"],
        withheld=payload.get("withheld", []),
        cache=payload.get("cache", "none"),
        cache_note=payload.get("cache_note", ""),
        usage=payload.get("usage", {}),
    )

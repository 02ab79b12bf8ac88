"""A small synchronous client for the `omnigen2` BLS stream, for tests (the SDK is the product client)."""

from __future__ import annotations

import json
import queue
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tritonclient.grpc as triton_grpc
from tritonclient.utils import InferenceServerException


@dataclass
class StreamResult:
    events: list[dict[str, Any]] = field(default_factory=list)
    images: np.ndarray | None = None
    latents: np.ndarray | None = None
    previews: int = 0
    error: InferenceServerException | None = None

    @property
    def result(self) -> dict[str, Any]:
        return self.events[-1]


class GenerationStream:
    """Starts one generation on `omnigen2` and collects its responses until the final one."""

    def __init__(
        self, url: str, params: dict[str, Any], images: list[bytes] | None = None, model: str = "omnigen2"
    ) -> None:
        self.client = triton_grpc.InferenceServerClient(url)
        self.responses: queue.Queue[tuple[Any, InferenceServerException | None]] = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.responses.put((result, error)))
        request = triton_grpc.InferInput("request", [1], "BYTES")
        request.set_data_from_numpy(np.array([json.dumps(params).encode()], dtype=np.object_))
        inputs = [request]
        if images:
            encoded = triton_grpc.InferInput("images", [len(images)], "BYTES")
            encoded.set_data_from_numpy(np.array(images, dtype=np.object_))
            inputs.append(encoded)
        self.client.async_stream_infer(model, inputs)
        self.collected = StreamResult()

    def next_event(self, timeout: float = 120.0) -> dict[str, Any] | None:
        """The next event, or None once the stream ended with an error (kept in `collected.error`)."""
        result, error = self.responses.get(timeout=timeout)
        if error is not None:
            self.collected.error = error
            return None
        event: dict[str, Any] = json.loads(result.as_numpy("event")[0])
        self.collected.events.append(event)
        if result.as_numpy("preview") is not None:
            self.collected.previews += 1
        if event["type"] == "result":
            self.collected.images = result.as_numpy("images")
            self.collected.latents = result.as_numpy("latents")
        return event

    def wait(self, timeout: float = 120.0) -> StreamResult:
        while True:
            event = self.next_event(timeout)
            if event is None or event["type"] in ("result", "done"):
                self.close()
                return self.collected

    def cancel(self) -> None:
        self.client.stop_stream(cancel_requests=True)

    def close(self) -> None:
        self.client.stop_stream()


def case_params(case: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    keys = ("prompt", "negative_prompt", "width", "height", "steps", "text_guidance_scale", "image_guidance_scale")
    params = {k: case[k] for k in keys} | {"cfg_range": case["cfg_range"], "seed": case["seed"]}
    optional: dict[str, Any] = {
        k: case[k] for k in ("num_images_per_prompt", "max_sequence_length", "cache") if k in case
    }
    if "teacache_rel_l1_thresh" in case:
        optional["teacache_threshold"] = case["teacache_rel_l1_thresh"]
    return params | {"scheduler": case["scheduler"]} | optional | overrides

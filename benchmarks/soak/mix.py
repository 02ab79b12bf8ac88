"""The storm's calls: seeded random requests for each kind, and the fixed probe requests whose pixels must not move."""

from __future__ import annotations

import base64
import io
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from omnigen2.v1 import omnigen2_pb2 as pb
from PIL import Image

# Kind -> share of the mix. Probes are the only calls left alone (no fault): their pixels are compared.
KINDS: dict[str, float] = {
    "generate": 0.22,
    "stream": 0.20,
    "understand": 0.13,
    "http-image": 0.10,
    "http-edit": 0.07,
    "http-chat": 0.10,
    "http-reset": 0.06,
    "probe": 0.12,
}
HTTP_PREFIX = "http-"  # the kinds sent to the OpenAI-style HTTP API; the rest are gRPC calls


def is_http(kind: str) -> bool:
    return kind.startswith(HTTP_PREFIX)


PROMPTS = ("a red apple", "a blue car on a road", "a cat", "a red apple")  # a repeat shares the text cache


def _png(width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


IMAGES = (_png(64, 64, 1), _png(96, 64, 2), _png(48, 80, 3))


def probes() -> dict[str, pb.GenerateRequest]:
    """Fixed seeded requests over the paths that share batches: T2I with 2 images, an edit, both step caches."""
    return {
        "t2i": pb.GenerateRequest(
            prompt="probe one apple", width=64, height=64, steps=6, seed=7, num_images_per_prompt=2
        ),
        "edit": pb.GenerateRequest(
            prompt="probe edit",
            input_images=[pb.Image(data=IMAGES[0]), pb.Image(data=IMAGES[1])],
            width=64,
            height=64,
            steps=5,
            seed=9,
        ),
        "teacache": pb.GenerateRequest(
            prompt="probe tea",
            width=96,
            height=64,
            steps=8,
            seed=11,
            cache=pb.STEP_CACHE_TEACACHE,
            teacache_threshold=0.3,
        ),
        "taylorseer": pb.GenerateRequest(
            prompt="probe taylor",
            input_images=[pb.Image(data=IMAGES[2])],
            width=64,
            height=96,
            steps=8,
            seed=12,
            cache=pb.STEP_CACHE_TAYLORSEER,
        ),
    }


@dataclass
class Fault:
    """At most one per call, so that the status it should end with is never a race between two of them."""

    deadline_s: float | None = None  # a gRPC deadline
    cancel_after_s: float | None = None  # the client cancels (gRPC) or drops the connection (HTTP) this late
    stop_after_events: int | None = None  # a stream read this far, then cancelled

    def describe(self) -> dict[str, Any]:
        return {key: value for key, value in vars(self).items() if value is not None}


@dataclass
class Mix:
    rng: random.Random
    kinds: list[str] = field(default_factory=lambda: list(KINDS))

    def kind(self) -> str:
        return self.rng.choices(self.kinds, weights=[KINDS[k] for k in self.kinds])[0]

    def fault(self, streamed: bool) -> Fault:
        roll = self.rng.random()
        if roll < 0.35:
            return Fault()
        if roll < 0.55:
            return Fault(deadline_s=self.rng.choice([0.05, 0.3, 1.0, 3.0]))
        if roll < 0.85 or not streamed:
            return Fault(cancel_after_s=self.rng.choice([0.0, 0.01, 0.1, 0.5, 1.0, 2.0, 4.0]))
        return Fault(stop_after_events=self.rng.choice([1, 2, 5]))

    def generate(self) -> pb.GenerateRequest:
        r = self.rng
        request = pb.GenerateRequest(
            prompt=r.choice(PROMPTS),
            width=r.choice([32, 64, 96, 128]),
            height=r.choice([32, 64, 96, 128]),
            steps=r.randint(1, 25),
            seed=r.randint(0, 1000),
            num_images_per_prompt=r.choice([1, 1, 2, 3]),
        )
        if r.random() < 0.3:
            request.input_images.extend(pb.Image(data=d) for d in r.sample(IMAGES, r.randint(1, 3)))
        if r.random() < 0.3:
            request.cache = r.choice([pb.STEP_CACHE_TEACACHE, pb.STEP_CACHE_TAYLORSEER])
        if r.random() < 0.2:
            request.negative_prompt = r.choice(["blurry", "low quality"])
        if r.random() < 0.2:
            request.scheduler = pb.SCHEDULER_DPMSOLVER
        return request

    def understand(self) -> pb.UnderstandRequest:
        r = self.rng
        parts = [pb.ContentPart(text=r.choice(["what is this?", "describe", "hello"]))]
        if r.random() < 0.5:
            parts.insert(0, pb.ContentPart(image=pb.Image(data=r.choice(IMAGES))))
        return pb.UnderstandRequest(
            messages=[pb.ChatMessage(content=parts)],
            max_new_tokens=r.randint(1, 60),
            seed=r.randint(0, 9),
            temperature=r.choice([0.0, 0.7]),
        )

    def http_image(self, stream: bool) -> dict[str, Any]:
        r = self.rng
        body: dict[str, Any] = {
            "prompt": r.choice(PROMPTS),
            "size": r.choice(["64x64", "128x128", "96x64"]),
            "n": r.choice([1, 2]),
            "num_inference_steps": r.randint(1, 15),
            "stream": stream,
            "response_format": "b64_json",
        }
        if stream:  # previews are of one image: a stream of 2 takes none
            body["partial_images"] = r.randint(0, 3) if body["n"] == 1 else 0
        return body

    def http_edit(self, stream: bool) -> list[tuple[str, bytes | str]]:
        """Multipart fields in order: the images, then the form's text fields."""
        r = self.rng
        fields: list[tuple[str, bytes | str]] = [("image[]", d) for d in r.sample(IMAGES, r.randint(1, 3))]
        fields += [("prompt", "make it green"), ("size", "64x64"), ("num_inference_steps", str(r.randint(1, 10)))]
        return [*fields, ("stream", "true")] if stream else fields

    def http_chat(self, stream: bool) -> dict[str, Any]:
        r = self.rng
        content: list[dict[str, Any]] = [{"type": "text", "text": "what is it?"}]
        if r.random() < 0.5:
            url = "data:image/png;base64," + base64.b64encode(r.choice(IMAGES)).decode()
            content.insert(0, {"type": "image_url", "image_url": {"url": url}})
        messages = [{"role": "user", "content": content}]
        return {"model": "OmniGen2", "messages": messages, "max_tokens": r.randint(1, 60), "stream": stream}

"""Chat requests for visual understanding and their limits: what the front end validates and the `mllm` model
takes. Imports neither torch nor transformers, so a front end can validate without them."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from omnigen2.limits import MAX_NEW_TOKENS, MAX_TOP_K, MIN_TEMPERATURE, MIN_VISION_PIXELS
from PIL import Image

from serving.errors import InvalidArgumentError
from serving.pipeline.request import MAX_SEED, SEED_RANGE, random_seed

ROLES = ("system", "user", "assistant")
# Qwen2.5-VL's resize refuses an image whose longer side is over this many times its shorter one.
MAX_ASPECT_RATIO = 200


@dataclass(frozen=True)
class ChatLimits:
    max_messages: int = 64
    max_parts: int = 256  # content parts of all messages together
    max_images: int = 5
    max_text_chars: int = 32_768  # all text parts together
    max_prompt_tokens: int = 8192  # after the template and the vision tokens
    max_new_tokens: int = MAX_NEW_TOKENS
    max_vision_pixels: int = 1280 * 28 * 28  # per image after resizing (Qwen2.5-VL's own default budget)
    max_input_image_pixels: int = 40_000_000  # decoded size of one input image, checked before decoding
    max_input_image_bytes: int = 20 * 1024 * 1024  # encoded size of one input image
    max_stop_strings: int = 8
    max_stop_chars: int = 64


DEFAULT_CHAT_LIMITS = ChatLimits()


@dataclass(frozen=True)
class ChatPart:
    text: str | None = None
    image: int | None = None  # index into the request's images


@dataclass(frozen=True)
class ChatMessage:
    role: str
    parts: list[ChatPart]


@dataclass
class ChatRequest:
    messages: list[ChatMessage]
    images: list[Image.Image] = field(default_factory=list)
    max_new_tokens: int = 512
    temperature: float = 0.0  # below MIN_TEMPERATURE (0 included): greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    max_pixels: int = DEFAULT_CHAT_LIMITS.max_vision_pixels  # per image, the vision encoder's budget

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    def violations(self, limits: ChatLimits = DEFAULT_CHAT_LIMITS) -> list[InvalidArgumentError]:
        found: list[InvalidArgumentError] = []

        def bad(name: str, message: str) -> None:
            found.append(InvalidArgumentError(name, message))

        if not self.messages:
            bad("messages", "at least one message")
        if len(self.messages) > limits.max_messages:
            bad("messages", f"at most {limits.max_messages} messages, got {len(self.messages)}")
        used: list[int] = []
        chars = 0
        for i, message in enumerate(self.messages):
            if message.role not in ROLES:
                bad(f"messages[{i}].role", f"one of {', '.join(ROLES)}, got {message.role!r}")
            if not message.parts:
                bad(f"messages[{i}].content", "at least one part")
            for j, part in enumerate(message.parts):
                if (part.text is None) == (part.image is None):
                    bad(f"messages[{i}].content[{j}]", "exactly one of text or image")
                if part.text is not None:
                    chars += len(part.text)
                if part.image is not None:
                    used.append(part.image)
                    if message.role == "system":
                        bad(f"messages[{i}].content[{j}]", "system messages hold text only")
        parts = sum(len(message.parts) for message in self.messages)
        if parts > limits.max_parts:
            bad("messages", f"at most {limits.max_parts} content parts in all, got {parts}")
        for index, image in enumerate(self.images):
            if aspect_ratio(image.height, image.width) > MAX_ASPECT_RATIO:
                bad(image_field(self.messages, index), aspect_ratio_message(image.height, image.width))
        if chars > limits.max_text_chars:
            bad("messages", f"at most {limits.max_text_chars} characters of text in all, got {chars}")
        if len(used) > limits.max_images:
            bad("messages", f"at most {limits.max_images} images, got {len(used)}")
        if not 1 <= self.max_new_tokens <= limits.max_new_tokens:
            bad("max_new_tokens", f"must be in [1, {limits.max_new_tokens}], got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and 0.0 <= self.temperature <= 2.0):
            bad("temperature", f"must be in [0, 2], got {self.temperature}")
        if not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if not 0 <= self.top_k <= MAX_TOP_K:
            bad("top_k", f"must be in [0, {MAX_TOP_K}], got {self.top_k}")
        if not 0 <= self.seed <= MAX_SEED:
            bad("seed", f"{SEED_RANGE}, got {self.seed}")
        if len(self.stop) > limits.max_stop_strings:
            bad("stop", f"at most {limits.max_stop_strings} stop strings")
        if any(not s or len(s) > limits.max_stop_chars for s in self.stop):
            bad("stop", f"stop strings must have 1 to {limits.max_stop_chars} characters")
        if not MIN_VISION_PIXELS <= self.max_pixels <= limits.max_vision_pixels:
            bad("max_pixels", f"must be in [{MIN_VISION_PIXELS}, {limits.max_vision_pixels}], got {self.max_pixels}")
        return found

    def validate(self, limits: ChatLimits = DEFAULT_CHAT_LIMITS) -> None:
        found = self.violations(limits)
        if found:
            raise found[0]


def aspect_ratio(height: int, width: int) -> float:
    return max(height, width) / max(1, min(height, width))


def aspect_ratio_message(height: int, width: int) -> str:
    return f"a {width}x{height} image: the longer side may be at most {MAX_ASPECT_RATIO} times the shorter"


def image_field(messages: list[ChatMessage], index: int) -> str:
    """The content part that holds image `index`, as the API names it."""
    for i, message in enumerate(messages):
        for j, part in enumerate(message.parts):
            if part.image == index:
                return f"messages[{i}].content[{j}].image"
    return f"images[{index}]"


def image_parts(messages: Any) -> dict[int, str]:
    """Image index -> the content part that holds it (`messages[i].content[j].image`), from the wire format's
    messages before they are checked: what a malformed message holds is left out."""
    fields: dict[int, str] = {}
    for i, message in enumerate(messages if isinstance(messages, list) else []):
        content = message.get("content") if isinstance(message, dict) else None
        for j, part in enumerate(content if isinstance(content, list) else []):
            index = part.get("image") if isinstance(part, dict) else None
            if isinstance(index, int):
                fields.setdefault(index, f"messages[{i}].content[{j}].image")
    return fields


def chat_request_from_params(params: Mapping[str, Any], images: list[Image.Image]) -> ChatRequest:
    """The `mllm` wire format (JSON) -> a request; shapes are checked here, ranges by `violations`."""
    names = ("max_new_tokens", "temperature", "top_p", "top_k", "stop", "max_pixels")
    for name in params:
        if name not in {*names, "messages", "seed"}:
            raise InvalidArgumentError(name, "unknown field")
    try:
        messages = [
            ChatMessage(
                role=str(m["role"]),
                parts=[ChatPart(text=p.get("text"), image=p.get("image")) for p in m["content"]],
            )
            for m in params["messages"]
        ]
    except (KeyError, TypeError, AttributeError) as exc:
        raise InvalidArgumentError("messages", f"malformed ({exc})") from exc
    used = sorted(p.image for m in messages for p in m.parts if p.image is not None)
    if used != list(range(len(images))):
        raise InvalidArgumentError("messages", "every image is referenced exactly once")
    options = {name: params[name] for name in names if params.get(name) is not None}
    seed = params.get("seed")
    return ChatRequest(messages=messages, images=images, seed=random_seed() if seed is None else seed, **options)

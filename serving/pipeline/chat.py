"""Visual understanding, model-independent parts: chat requests and their limits, the chat template with vision
tokens, streaming detokenization and stop strings. The Triton `mllm` model and the eager reference share them."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from serving.errors import InvalidArgumentError
from serving.pipeline.request import random_seed

ROLES = ("system", "user", "assistant")
IMAGE_PAD = "<|image_pad|>"
# Below this, sampling is greedy decoding: logits divided by 1e-40 overflow to inf and the probabilities to NaN.
MIN_TEMPERATURE = 0.01


@dataclass(frozen=True)
class ChatLimits:
    max_messages: int = 64
    max_images: int = 5
    max_text_chars: int = 32_768  # all text parts together
    max_prompt_tokens: int = 8192  # after the template and the vision tokens
    max_new_tokens: int = 2048
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
        if not 0 <= self.top_k <= 1000:
            bad("top_k", f"must be in [0, 1000], got {self.top_k}")
        if not 0 <= self.seed < 2**63:
            bad("seed", "must be in [0, 2^63)")
        if len(self.stop) > limits.max_stop_strings:
            bad("stop", f"at most {limits.max_stop_strings} stop strings")
        if any(not s or len(s) > limits.max_stop_chars for s in self.stop):
            bad("stop", f"stop strings must have 1 to {limits.max_stop_chars} characters")
        if not 28 * 28 <= self.max_pixels <= limits.max_vision_pixels:
            bad("max_pixels", f"must be in [784, {limits.max_vision_pixels}], got {self.max_pixels}")
        return found

    def validate(self, limits: ChatLimits = DEFAULT_CHAT_LIMITS) -> None:
        found = self.violations(limits)
        if found:
            raise found[0]


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


@dataclass
class ChatInputs:
    input_ids: torch.Tensor  # (1, L)
    attention_mask: torch.Tensor  # (1, L)
    pixel_values: torch.Tensor | None  # (patches, C * T * P * P)
    image_grid_thw: torch.Tensor | None  # (images, 3)

    def as_kwargs(self) -> dict[str, torch.Tensor]:
        kwargs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.pixel_values is not None and self.image_grid_thw is not None:
            kwargs |= {"pixel_values": self.pixel_values, "image_grid_thw": self.image_grid_thw}
        return kwargs


class ChatEncoder:
    """Messages + images -> model inputs: the processor's chat template, each image's `<|image_pad|>` repeated
    once per merged vision patch (what Qwen2.5-VL's processor does; that processor itself wants torchvision)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, image_processor: Qwen2VLImageProcessorPil) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor

    @classmethod
    def from_dir(cls, processor_dir: Path | str) -> ChatEncoder:
        return cls(
            AutoTokenizer.from_pretrained(processor_dir), Qwen2VLImageProcessorPil.from_pretrained(processor_dir)
        )

    def template(self, request: ChatRequest) -> str:
        messages = [
            {
                "role": m.role,
                "content": [
                    {"type": "text", "text": p.text} if p.image is None else {"type": "image"} for p in m.parts
                ],
            }
            for m in request.messages
        ]
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)  # type: ignore[arg-type]
        return str(text)

    def vision_size(self, request: ChatRequest) -> dict[str, int]:
        """The checkpoint's own pixel bounds (processor/preprocessor_config.json); a request may only lower the
        upper one, which also keeps the serving budget on a checkpoint that allows more."""
        own = self.image_processor.size
        if request.max_pixels < own["shortest_edge"]:
            raise InvalidArgumentError("max_pixels", f"below this model's minimum of {own['shortest_edge']}")
        return {"shortest_edge": own["shortest_edge"], "longest_edge": min(own["longest_edge"], request.max_pixels)}

    def encode(self, request: ChatRequest, limits: ChatLimits = DEFAULT_CHAT_LIMITS) -> ChatInputs:
        text = self.template(request)
        pixel_values = grid = None
        if request.images:
            # Images in the order they appear in the conversation.
            order = [p.image for m in request.messages for p in m.parts if p.image is not None]
            vision = self.image_processor(
                images=[request.images[i] for i in order], size=self.vision_size(request), return_tensors="pt"
            )
            pixel_values, grid = vision["pixel_values"], vision["image_grid_thw"]
            merge = self.image_processor.merge_size**2
            pieces = text.split(IMAGE_PAD)
            text = pieces[0] + "".join(
                IMAGE_PAD * (int(g.prod()) // merge) + piece for g, piece in zip(grid, pieces[1:], strict=True)
            )
        ids = self.tokenizer(text, return_tensors="pt")
        if ids["input_ids"].shape[1] > limits.max_prompt_tokens:
            length = ids["input_ids"].shape[1]
            raise InvalidArgumentError("messages", f"{length} prompt tokens, the limit is {limits.max_prompt_tokens}")
        return ChatInputs(ids["input_ids"], ids["attention_mask"], pixel_values, grid)


def _template_part(part: ChatPart) -> dict[str, str]:
    return {"type": "image"} if part.image is not None else {"type": "text", "text": part.text or ""}


class TextDeltas:
    """Token ids in, text pieces out. A piece is emitted once later tokens can no longer change it (no half
    UTF-8 character), decoding only a short window, so a long answer costs linear time."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before) :]

    def flush(self) -> str:
        """What is still held back at the end (a trailing incomplete character decodes as U+FFFD)."""
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :]


class StopStrings:
    """Holds back text that could be the start of a stop string; reports where the first stop string begins."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.text = ""
        self.sent = 0
        self.stopped = False

    def feed(self, piece: str) -> str:
        """The text now safe to send."""
        self.text += piece
        hits = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            self.text = self.text[: min(hits)]
            return self._release(len(self.text))
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        return self._release(len(self.text) - hold)

    def flush(self) -> str:
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        piece = self.text[self.sent : upto]
        self.sent = max(self.sent, upto)
        return piece

"""API messages <-> the Triton models' wire formats: field validation, defaults, output encoding (GetModelInfo's
messages: model_info.py; the request-size check: request_size.py)."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from google.protobuf.message import Message
from omnigen2.v1 import omnigen2_pb2 as pb

from serving.errors import InvalidArgumentError
from serving.frontend.status import invalid_argument
from serving.pipeline.chat_request import (
    MAX_ASPECT_RATIO,
    ChatLimits,
    ChatMessage,
    ChatPart,
    ChatRequest,
    aspect_ratio,
    aspect_ratio_message,
)
from serving.pipeline.cost import ChatCost, GenerationCost, chat_cost, generation_cost
from serving.pipeline.images import model_size, open_image, oriented_size, to_pil
from serving.pipeline.request import (
    CacheKind,
    GenerationRequest,
    Limits,
    SchedulerKind,
    random_seed,
)

SCHEDULERS = {
    pb.SCHEDULER_UNSPECIFIED: SchedulerKind.EULER,
    pb.SCHEDULER_EULER: SchedulerKind.EULER,
    pb.SCHEDULER_DPMSOLVER: SchedulerKind.DPMSOLVER,
}
STEP_CACHES = {
    pb.STEP_CACHE_UNSPECIFIED: CacheKind.NONE,
    pb.STEP_CACHE_NONE: CacheKind.NONE,
    pb.STEP_CACHE_TEACACHE: CacheKind.TEACACHE,
    pb.STEP_CACHE_TAYLORSEER: CacheKind.TAYLORSEER,
}
API_STEP_CACHES = {kind: value for value, kind in STEP_CACHES.items() if value != pb.STEP_CACHE_UNSPECIFIED}
FORMATS = {
    pb.IMAGE_FORMAT_UNSPECIFIED: "PNG",
    pb.IMAGE_FORMAT_PNG: "PNG",
    pb.IMAGE_FORMAT_JPEG: "JPEG",
    pb.IMAGE_FORMAT_WEBP: "WEBP",
}
MIME_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
DEFAULT_QUALITY = 90
DEFAULTS = GenerationRequest(prompt="")
# The pipeline's name for a field -> the API's.
API_FIELD = {"images": "input_images"}
_OPTIONAL = (
    "width",
    "height",
    "steps",
    "text_guidance_scale",
    "image_guidance_scale",
    "num_images_per_prompt",
    "max_pixels",
    "max_input_image_side_length",
    "max_sequence_length",
    "teacache_threshold",
)


@dataclass(frozen=True)
class Forward:
    """One validated request as the `omnigen2` BLS takes it, plus what the front end does with the result."""

    params: dict[str, Any]
    images: list[bytes]
    output_format: str
    quality: int
    previews: bool
    return_latents: bool
    cost: GenerationCost
    preview_every: int = 1

    @property
    def seed(self) -> int:
        return int(self.params["seed"])

    def request_json(self) -> bytes:
        # "preview": 0 for none, else the interval in steps
        return json.dumps(self.params | {"preview": self.preview_every if self.previews else 0}).encode()


def to_forward(request: pb.GenerateRequest, limits: Limits) -> Forward:
    """Validate every field (all violations reported together) and fill in the defaults."""
    violations: list[tuple[str, str]] = []

    sizes = []  # (height, width) from the headers: the images are decoded once, by the BLS
    sized_fields: list[str] = []  # the field of each of `sizes`
    if len(request.input_images) > limits.max_input_images:
        violations.append(
            ("input_images", f"at most {limits.max_input_images} images, got {len(request.input_images)}")
        )
    else:
        for i, image in enumerate(request.input_images):
            try:
                field = f"input_images[{i}].data"
                sizes.append(
                    _header_size(image.data, field, limits.max_input_image_pixels, limits.max_input_image_bytes)
                )
                sized_fields.append(field)
            except InvalidArgumentError as exc:
                violations.append((exc.field, exc.description))

    scheduler = SCHEDULERS.get(request.scheduler)
    if scheduler is None:
        violations.append(("scheduler", f"unknown value {request.scheduler}"))
    cache = STEP_CACHES.get(request.cache)
    if cache is None:
        violations.append(("cache", f"unknown value {request.cache}"))
    values = {name: getattr(request, name) if request.HasField(name) else getattr(DEFAULTS, name) for name in _OPTIONAL}
    cfg_range = (
        (request.cfg_range.start, request.cfg_range.end) if request.HasField("cfg_range") else DEFAULTS.cfg_range
    )
    generation = GenerationRequest(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        cfg_range=cfg_range,
        seed=request.seed if request.HasField("seed") else random_seed(),
        scheduler=(scheduler or SchedulerKind.EULER).value,
        cache=(cache or CacheKind.NONE).value,
        **values,
    )
    invalid = generation.violations(limits)
    violations += [(API_FIELD.get(e.field, e.field), e.description) for e in invalid]
    if not {e.field for e in invalid} & {"max_pixels", "max_input_image_side_length"}:
        # Every image too small for the model, named here, before admission: the BLS would stop at the first.
        violations += _model_size_violations(sizes, sized_fields, generation)

    output_format = FORMATS.get(request.output_format)
    if output_format is None:
        violations.append(("output_format", f"unknown value {request.output_format}"))
    quality = request.quality if request.HasField("quality") else DEFAULT_QUALITY
    if not 1 <= quality <= 100:
        violations.append(("quality", f"must be in [1, 100], got {quality}"))
    preview_every = request.preview_every if request.HasField("preview_every") else 1
    if not 1 <= preview_every <= limits.max_steps:
        violations.append(("preview_every", f"must be in [1, {limits.max_steps}], got {preview_every}"))
    if violations:
        raise invalid_argument(violations)

    params = {f.name: getattr(generation, f.name) for f in fields(GenerationRequest) if f.name != "images"}
    params["cfg_range"] = list(generation.cfg_range)
    return Forward(
        params=params,
        images=[image.data for image in request.input_images],
        output_format=output_format or "PNG",
        quality=quality,
        previews=request.previews,
        preview_every=preview_every,
        return_latents=request.return_latents,
        cost=generation_cost(generation, sizes, request.return_latents),
    )


def _model_size_violations(
    sizes: list[tuple[int, int]], names: list[str], generation: GenerationRequest
) -> list[tuple[str, str]]:
    found = []
    for (height, width), name in zip(sizes, names, strict=True):
        try:
            model_size(height, width, generation.max_pixels, generation.max_input_image_side_length, name)
        except InvalidArgumentError as exc:
            found.append((exc.field, exc.description))
    return found


def encode_images(images: np.ndarray, output_format: str, quality: int) -> list[pb.Image]:
    """uint8 NHWC images -> encoded images."""
    encoded = []
    for picture in to_pil(images):
        buffer = io.BytesIO()
        options = {"compress_level": 1} if output_format == "PNG" else {"quality": quality}
        picture.save(buffer, format=output_format, **options)
        encoded.append(
            pb.Image(
                data=buffer.getvalue(),
                mime_type=MIME_TYPES[output_format],
                width=picture.width,
                height=picture.height,
            )
        )
    return encoded


def tensor(array: np.ndarray) -> pb.Tensor:
    data = np.ascontiguousarray(array, dtype="<f4")
    return pb.Tensor(shape=list(data.shape), data=data.tobytes())


ROLES = {
    pb.ROLE_UNSPECIFIED: "user",
    pb.ROLE_USER: "user",
    pb.ROLE_ASSISTANT: "assistant",
    pb.ROLE_SYSTEM: "system",
}
FINISH_REASONS = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "stop_string": pb.FINISH_REASON_STOP_STRING,
}
CHAT_DEFAULTS = ChatRequest(messages=[])
CHAT_OPTIONAL = ("max_new_tokens", "temperature", "top_p", "top_k", "max_pixels")


@dataclass(frozen=True)
class ChatForward:
    """One validated Understand request as the `mllm` model takes it."""

    params: dict[str, Any]
    images: list[bytes]
    input_pixels: int  # decoded pixels of the images, as their headers state
    cost: ChatCost  # the answer's tokens, an upper bound from the request and the images' headers

    @property
    def seed(self) -> int:
        return int(self.params["seed"])

    def request_json(self) -> bytes:
        return json.dumps(self.params).encode()


def check_counts(request: Message, limits: Limits, chat_limits: ChatLimits) -> None:
    """The counts of a request's repeated fields, refused at once when over their limits: everything else that
    reads a request (the prompt policy, validation, the access log) walks them, and 3 million empty messages took
    30 s of a core to be refused so. Costs at most max_messages steps."""
    if isinstance(request, pb.GenerateRequest) and len(request.input_images) > limits.max_input_images:
        found = len(request.input_images)
        raise invalid_argument([("input_images", f"at most {limits.max_input_images} images, got {found}")])
    if isinstance(request, pb.UnderstandRequest):
        check_chat_counts(request, chat_limits)


def check_chat_counts(request: pb.UnderstandRequest, limits: ChatLimits) -> None:
    count = len(request.messages)
    if count > limits.max_messages:
        raise invalid_argument([("messages", f"at most {limits.max_messages} messages, got {count}")])
    parts = sum(len(message.content) for message in request.messages)
    if parts > limits.max_parts:
        raise invalid_argument([("messages", f"at most {limits.max_parts} content parts in all, got {parts}")])
    if len(request.stop) > limits.max_stop_strings:
        raise invalid_argument([("stop", f"at most {limits.max_stop_strings} stop strings")])


def to_chat_forward(request: pb.UnderstandRequest, limits: ChatLimits) -> ChatForward:
    """Validate every field (violations together, after the counts); images become indices into `images`."""
    check_chat_counts(request, limits)
    violations: list[tuple[str, str]] = []
    messages: list[ChatMessage] = []
    blobs: list[bytes] = []
    sizes: list[tuple[int, int]] = []
    for i, message in enumerate(request.messages):
        role = ROLES.get(message.role)
        if role is None:
            violations.append((f"messages[{i}].role", f"unknown value {message.role}"))
        parts = []
        for j, part in enumerate(message.content):
            kind = part.WhichOneof("part")
            if kind == "text":
                parts.append(ChatPart(text=part.text))
            elif kind == "image":
                if len(blobs) < limits.max_images:  # beyond the limit: counted, never opened
                    field = f"messages[{i}].content[{j}].image.data"
                    try:
                        height, width = _header_size(
                            part.image.data, field, limits.max_input_image_pixels, limits.max_input_image_bytes
                        )
                        sizes.append((height, width))
                        if aspect_ratio(height, width) > MAX_ASPECT_RATIO:
                            violations.append((field, aspect_ratio_message(height, width)))
                    except InvalidArgumentError as exc:
                        violations.append((exc.field, exc.description))
                parts.append(ChatPart(image=len(blobs)))
                blobs.append(part.image.data)
            else:
                violations.append((f"messages[{i}].content[{j}]", "empty: set text or image"))
        messages.append(ChatMessage(role or "user", parts))
    options = {n: getattr(request, n) if request.HasField(n) else getattr(CHAT_DEFAULTS, n) for n in CHAT_OPTIONAL}
    chat = ChatRequest(
        messages=messages,
        seed=request.seed if request.HasField("seed") else random_seed(),
        stop=list(request.stop),
        **options,
    )
    violations += [(e.field, e.description) for e in chat.violations(limits)]
    if violations:
        raise invalid_argument(violations)
    params = {name: getattr(chat, name) for name in (*CHAT_OPTIONAL, "seed", "stop")}
    params["messages"] = [
        {"role": m.role, "content": [{"text": p.text} if p.image is None else {"image": p.image} for p in m.parts]}
        for m in messages
    ]
    texts = [p.text for m in messages for p in m.parts if p.text is not None]
    cost = chat_cost(texts, len(messages), sizes, chat.max_pixels, chat.max_new_tokens, limits.max_prompt_tokens)
    return ChatForward(params=params, images=blobs, input_pixels=sum(h * w for h, w in sizes), cost=cost)


def _header_size(data: bytes, field: str, max_pixels: int, max_bytes: int) -> tuple[int, int]:
    """(height, width) from the image's header, as displayed (EXIF orientation); nothing is decoded here."""
    with open_image(data, field, max_pixels, max_bytes) as image:
        return oriented_size(image)


def chat_result(done: dict[str, Any], seed: int, seconds: float) -> pb.UnderstandResult:
    return pb.UnderstandResult(
        text=done["text"],
        finish_reason=FINISH_REASONS.get(done["finish_reason"], pb.FINISH_REASON_UNSPECIFIED),
        usage=pb.Usage(prompt_tokens=done["prompt_tokens"], completion_tokens=done["completion_tokens"]),
        seed=seed,
        token_ids=done["token_ids"],
        seconds=seconds,
    )

"""What the SDK takes and gives: image inputs, options, conversations, results and progress events."""

from __future__ import annotations

import difflib
import io
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypedDict, TypeVar, Union, cast

from PIL import Image

from omnigen2.limits import MAX_SEED
from omnigen2.v1 import omnigen2_pb2 as pb

if TYPE_CHECKING:
    import numpy as np

# A PIL image, a path to an image file, or the encoded bytes of one.
ImageInput = Union[Image.Image, str, os.PathLike[str], bytes]  # noqa: UP007 (a runtime alias)
# The `images` argument: one image, or a sequence of them.
Images = Union[ImageInput, Sequence[ImageInput]]  # noqa: UP007 (a runtime alias)
SchedulerName = Literal["euler", "dpmsolver"]
CacheName = Literal["none", "teacache", "taylorseer"]
FormatName = Literal["png", "jpeg", "webp"]

_Enum = TypeVar("_Enum", pb.Scheduler, pb.ImageFormat, pb.Role, pb.StepCache)
_Message = TypeVar("_Message", pb.GenerateRequest, pb.UnderstandRequest)
_SCHEDULERS = {"euler": pb.SCHEDULER_EULER, "dpmsolver": pb.SCHEDULER_DPMSOLVER}
_CACHES = {"none": pb.STEP_CACHE_NONE, "teacache": pb.STEP_CACHE_TEACACHE, "taylorseer": pb.STEP_CACHE_TAYLORSEER}
_CACHE_NAMES = {value: name for name, value in _CACHES.items()} | {pb.STEP_CACHE_UNSPECIFIED: "none"}
_FORMATS = {"png": pb.IMAGE_FORMAT_PNG, "jpeg": pb.IMAGE_FORMAT_JPEG, "webp": pb.IMAGE_FORMAT_WEBP}


class GenerationOptions(TypedDict, total=False):
    """Optional settings of a generation; unset ones take the server's defaults (see `info().defaults`)."""

    negative_prompt: str
    width: int
    height: int
    steps: int
    text_guidance_scale: float
    image_guidance_scale: float
    cfg_range: tuple[float, float]
    scheduler: SchedulerName
    seed: int
    num_images_per_prompt: int
    max_pixels: int
    max_input_image_side_length: int
    max_sequence_length: int  # prompt tokens kept, chat template included (see info().limits)
    output_format: FormatName
    quality: int
    return_latents: bool
    preview_every: int  # with previews: one every this many steps, and on the last (default 1)
    cache: CacheName  # step caching (default none): faster, drifting a little from the uncached image
    teacache_threshold: float  # TeaCache's threshold in (0, 1] (default 0.05): larger is faster


# PIL modes PNG cannot hold: sent as RGB, as PIL converts them.
_TO_RGB = frozenset({"CMYK", "YCbCr", "LAB", "HSV"})


def encode_image(image: ImageInput) -> pb.Image:
    """Images travel encoded: files and bytes as they are, PIL images as PNG (CMYK and other colour spaces PNG has
    no room for as RGB). Float (mode F) images are refused: their samples have no agreed scale to 8 bits."""
    if isinstance(image, Image.Image):
        if image.mode == "F":
            raise ValueError("a floating-point (mode F) image: convert it to 8-bit first, e.g. to mode L or RGB")
        if image.mode in _TO_RGB:
            image = image.convert("RGB")
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return pb.Image(data=buffer.getvalue(), mime_type="image/png")
    if isinstance(image, bytes):
        return pb.Image(data=image)
    return pb.Image(data=Path(image).read_bytes())


def image_list(images: Images) -> list[ImageInput]:
    """One image (a path, bytes or a PIL image) as a list of one: a str path or bytes iterated would be its letters
    or byte values."""
    if isinstance(images, str | bytes | os.PathLike | Image.Image):
        return [images]
    return list(images)


# Other names callers bring for the SDK's options: the reference pipeline's and diffusers' (num_inference_steps,
# guidance_scale, input_images) and the HTTP API's (n, max_tokens, max_completion_tokens).
_ALIASES = {
    "num_inference_steps": "steps",
    "guidance_scale": "text_guidance_scale",
    "input_images": "images",
    "n": "num_images_per_prompt",
    "max_tokens": "max_new_tokens",
    "max_completion_tokens": "max_new_tokens",
}


def check_names(options: Mapping[str, Any], known: type[GenerationOptions] | type[UnderstandOptions]) -> None:
    """TypeError naming an option the call does not take, and the SDK's name for it where there is one: protobuf's
    own error names its message ("GenerateRequest has no ... field"), not the SDK's call or the right name."""
    names = set(known.__annotations__)
    for name in options:
        if name in names:
            continue
        alias = _ALIASES.get(name)
        close = [alias] if alias in {*names, "images"} else difflib.get_close_matches(name, names, 1)
        hint = f"; the SDK calls it {close[0]!r}" if close else f"; options: {', '.join(sorted(names))}"
        raise TypeError(f"unexpected keyword argument {name!r}{hint}")


def build_request(
    prompt: str, images: Images, options: GenerationOptions, previews: bool = False
) -> pb.GenerateRequest:
    check_names(options, GenerationOptions)
    fields: dict[str, Any] = dict(options)
    cfg_range = fields.pop("cfg_range", None)
    scheduler = fields.pop("scheduler", None)
    output_format = fields.pop("output_format", None)
    cache = fields.pop("cache", None)
    request = _message(
        pb.GenerateRequest,
        fields,
        prompt=prompt,
        input_images=[encode_image(i) for i in image_list(images)],
        previews=previews,
    )
    if cfg_range is not None:
        try:
            request.cfg_range.start, request.cfg_range.end = cfg_range
        except (ValueError, OverflowError) as exc:
            raise ValueError(f"cfg_range: {exc}") from None
    if scheduler is not None:
        request.scheduler = _choice(_SCHEDULERS, scheduler, "scheduler")
    if output_format is not None:
        request.output_format = _choice(_FORMATS, output_format, "output_format")
    if cache is not None:
        request.cache = _choice(_CACHES, cache, "cache")
    return request


def _choice(table: Mapping[str, _Enum], value: str, name: str) -> _Enum:
    if value not in table:
        raise ValueError(f"{name}: one of {', '.join(table)}, got {value!r}")
    return table[value]


@dataclass(frozen=True)
class Latents:
    shape: tuple[int, ...]
    data: bytes  # float32, little-endian, row-major

    def numpy(self) -> np.ndarray:
        import numpy as np

        return np.frombuffer(self.data, dtype="<f4").reshape(self.shape)


@dataclass(frozen=True)
class SafetyFinding:
    """A class the server's safety classifier scored at or over the operator's threshold."""

    label: str
    score: float
    threshold: float


@dataclass(frozen=True)
class WithheldImage:
    """A generated image the server kept back, and why (highest score first)."""

    index: int  # among the request's generated images, 0-based
    findings: list[SafetyFinding]

    @classmethod
    def from_proto(cls, withheld: pb.WithheldImage) -> WithheldImage:
        findings = [SafetyFinding(f.label, f.score, f.threshold) for f in withheld.findings]
        return cls(index=withheld.index, findings=findings)


@dataclass(frozen=True)
class GenerationUsage:
    """A generation's tokens, each counted once (GenerateUsage in the proto says exactly what counts)."""

    text_tokens: int = 0  # the templated prompt, and the negative prompt when text guidance uses it
    image_tokens: int = 0  # the input images' 16x16-pixel patches
    output_tokens: int = 0  # the generated images' 16x16-pixel patches, all images (withheld ones too)

    @classmethod
    def from_proto(cls, usage: pb.GenerateUsage) -> GenerationUsage:
        return cls(usage.text_tokens, usage.image_tokens, usage.output_tokens)


@dataclass(frozen=True)
class GenerationResult:
    images: list[Image.Image]  # the generated images, less any withheld ones
    seed: int  # pass it back to reproduce the images
    timings: dict[str, float]  # seconds per stage: queue, text_encode, vae_encode, denoise, vae_decode, total
    latents: Latents | None = None
    encoded: list[bytes] = field(default_factory=list, repr=False)  # the images as the server encoded them
    truncated_prompt_tokens: int = 0  # tokens cut from the prompt at max_sequence_length
    truncated_negative_prompt_tokens: int = 0
    withheld: list[WithheldImage] = field(default_factory=list)  # kept back by the server's safety classifier
    served_by: str = ""  # the replica that served the call (its x-served-by; with several, which one it was)
    request_id: str = ""  # the call's x-request-id, as the server logs it
    cache: CacheName = "none"  # the step caching that ran
    cache_note: str = ""  # why it is not the one asked for (e.g. the server was short of cache memory)
    usage: GenerationUsage = field(default_factory=GenerationUsage)

    @classmethod
    def from_proto(cls, response: pb.GenerateResponse) -> GenerationResult:
        timings = {f.name: getattr(response.timings, f.name) for f in pb.StageTimings.DESCRIPTOR.fields}
        latents = None
        if response.HasField("latents"):
            latents = Latents(tuple(response.latents.shape), response.latents.data)
        return cls(
            images=[_decode(image.data) for image in response.images],
            seed=response.seed,
            timings=timings,
            latents=latents,
            encoded=[image.data for image in response.images],
            truncated_prompt_tokens=response.truncated_prompt_tokens,
            truncated_negative_prompt_tokens=response.truncated_negative_prompt_tokens,
            withheld=[WithheldImage.from_proto(w) for w in response.withheld],
            cache=cast(CacheName, _CACHE_NAMES.get(response.cache, "none")),  # _CACHES' keys: CacheName's values
            cache_note=response.cache_note,
            usage=GenerationUsage.from_proto(response.usage),
        )


@dataclass(frozen=True)
class Progress:
    step: int  # steps done, 1..total
    total: int
    preview: Image.Image | None = None
    preview_withheld: bool = False  # the server's safety classifier kept this preview back

    @classmethod
    def from_proto(cls, progress: pb.Progress) -> Progress:
        preview = _decode(progress.preview.data) if progress.HasField("preview") else None
        return cls(progress.step, progress.total_steps, preview, progress.preview_withheld)


def _decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


Role = Literal["user", "assistant", "system"]
_ROLES = {"user": pb.ROLE_USER, "assistant": pb.ROLE_ASSISTANT, "system": pb.ROLE_SYSTEM}
_FINISH = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_STOP_STRING: "stop_string",
}


@dataclass(frozen=True)
class ChatTurn:
    """One message of a conversation. In `content`, a str is text; pass images as PIL images, bytes or Paths."""

    role: Role
    content: Sequence[str | Image.Image | bytes | os.PathLike[str]]


class UnderstandOptions(TypedDict, total=False):
    """Optional settings of an answer; unset ones take the server's defaults (`info().understand_defaults`)."""

    max_new_tokens: int
    temperature: float  # 0 (the default): greedy
    top_p: float
    top_k: int
    seed: int
    stop: list[str]
    max_pixels: int  # per image, info().understand_limits.min_pixels..max_pixels (3136..1003520 by default)


def build_understand_request(
    prompt: str | Sequence[ChatTurn], images: Images, options: UnderstandOptions
) -> pb.UnderstandRequest:
    """A str prompt is one user message: the images first, then the question."""
    check_names(options, UnderstandOptions)
    turns = (
        [ChatTurn("user", [*(_as_image(i) for i in image_list(images)), prompt])] if isinstance(prompt, str) else prompt
    )
    messages = [
        pb.ChatMessage(
            role=_choice(_ROLES, turn.role, "role"),
            content=[
                pb.ContentPart(text=part) if isinstance(part, str) else pb.ContentPart(image=encode_image(part))
                for part in turn.content
            ],
        )
        for turn in turns
    ]
    return _message(pb.UnderstandRequest, dict(options), messages=messages)


def _message(kind: type[_Message], options: dict[str, Any], **given: Any) -> _Message:
    """kind(**given, **options), failing with an error that names the option at fault: protobuf's own ("Value out
    of range: 9223372036854775808") names none."""
    seed = options.get("seed")
    if isinstance(seed, int) and seed > MAX_SEED:  # past int64; a negative one is the server's to refuse
        raise ValueError(f"seed: 0..2^63-1 (the server's range), got {seed}")
    try:
        return kind(**given, **options)
    except (TypeError, ValueError, OverflowError):
        for name, value in options.items():
            try:
                kind(**{name: value})
            except TypeError as exc:
                raise TypeError(f"{name}: {exc}") from None
            except (ValueError, OverflowError) as exc:
                raise ValueError(f"{name}: {exc}") from None
        raise


def _as_image(image: ImageInput) -> Image.Image | bytes | os.PathLike[str]:
    """Inside a message a str would be text, so image paths given as str become Paths."""
    return Path(image) if isinstance(image, str) else image


@dataclass(frozen=True)
class UnderstandResult:
    text: str
    finish_reason: str  # "stop" (the model ended), "length" (max_new_tokens) or "stop_string"
    prompt_tokens: int
    completion_tokens: int
    seed: int
    token_ids: list[int]
    seconds: float
    served_by: str = ""  # the replica that served the call
    request_id: str = ""  # the call's x-request-id, as the server logs it

    @classmethod
    def from_proto(cls, result: pb.UnderstandResult) -> UnderstandResult:
        return cls(
            text=result.text,
            finish_reason=_FINISH.get(result.finish_reason, "unspecified"),
            prompt_tokens=result.usage.prompt_tokens,
            completion_tokens=result.usage.completion_tokens,
            seed=result.seed,
            token_ids=list(result.token_ids),
            seconds=result.seconds,
        )

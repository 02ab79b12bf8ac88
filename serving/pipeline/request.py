"""A generation request, its documented limits and its validation (errors name the field)."""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from typing import Any

from omnigen2.limits import (
    MAX_INPUT_IMAGES,
    MAX_SEED,
    MAX_SEQUENCE_LENGTH,
    MIN_INPUT_IMAGE_SIDE,
    MIN_MAX_PIXELS,
    RANDOM_SEEDS,
)
from PIL import Image

from serving.errors import InvalidArgumentError
from serving.pipeline.invisible import is_blank


class SchedulerKind(StrEnum):
    """The solvers a request may name (serving/pipeline/schedulers.py runs them)."""

    EULER = "euler"
    DPMSOLVER = "dpmsolver++"


class CacheKind(StrEnum):
    """Step caching a request may ask for (serving/pipeline/step_cache.py runs them)."""

    NONE = "none"
    TEACACHE = "teacache"  # skip a CFG branch's main layers while its input barely changes
    TAYLORSEER = "taylorseer"  # extrapolate the main layers' output between full steps


DEFAULT_TEACACHE_THRESHOLD = 0.05  # the official default ("about 30 % faster")
MAX_TEACACHE_THRESHOLD = 1.0


SEED_RANGE = f"must be an integer in [0, {MAX_SEED}]"
DEFAULT_MAX_SEQUENCE_LENGTH = MAX_SEQUENCE_LENGTH  # what the official inference script and app pass


@dataclass(frozen=True)
class Limits:
    """Bounds every front door enforces; `GetModelInfo` reports them."""

    max_input_images: int = MAX_INPUT_IMAGES
    max_steps: int = 200
    max_side: int = 4096  # requested width/height; generation is further bounded by max_pixels
    max_pixels: int = 2048 * 2048
    max_images_per_prompt: int = 8
    max_guidance: float = 100.0
    max_prompt_chars: int = 8192  # a cheap pre-check; tokens are bounded by max_sequence_length
    # Static bound (the full checkpoint's text positions); the served checkpoint's own bound is checked where it is
    # loaded (`GenerationRequest.sequence_length`).
    max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH
    max_input_image_pixels: int = 40_000_000  # decoded size of one input image, checked before decoding
    max_input_image_bytes: int = 20 * 1024 * 1024  # encoded size of one input image


def limits_from_json(text: str) -> Limits:
    """Limits from a JSON object of the fields to change (the operator's `--limits`); unknown names are refused."""
    import json

    try:
        raw = json.loads(text) if text.strip() else {}
    except ValueError as exc:
        raise ValueError(f"--limits: not JSON: {exc} ({text})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"--limits: not a JSON object of limit -> value ({text})")
    defaults = asdict(Limits())
    unknown = sorted(set(raw) - set(defaults))
    if unknown:
        raise ValueError(f"--limits: unknown field {', '.join(unknown)}; known: {', '.join(sorted(defaults))}")
    for name, value in raw.items():
        # Each limit is a count or a size (a whole number), max_guidance a scale: all above 0.
        kind = type(defaults[name])
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"--limits: {name} must be a finite number ({value!r})")
        if kind is int and value != int(value):
            raise ValueError(f"--limits: {name} must be a whole number ({value!r})")
        if value <= 0:
            raise ValueError(f"--limits: {name} must be > 0 ({value!r})")
        # JSON's 100.0 is a float: an int field keeps int (the limits are sent as int64 in GetModelInfo).
        raw[name] = kind(value)
    return Limits(**{**defaults, **raw})


DEFAULT_LIMITS = Limits()


@dataclass
class GenerationRequest:
    prompt: str
    negative_prompt: str = ""
    images: list[Image.Image] = field(default_factory=list)
    width: int | None = None
    height: int | None = None
    steps: int = 50
    text_guidance_scale: float = 5.0
    image_guidance_scale: float = 2.0
    cfg_range: tuple[float, float] = (0.0, 1.0)
    seed: int = 0
    scheduler: str = SchedulerKind.EULER.value
    num_images_per_prompt: int = 1
    max_pixels: int = 1024 * 1024
    max_input_image_side_length: int = 1024
    # Prompt tokens kept (chat template included); None: 1024, or the checkpoint's text positions if fewer.
    max_sequence_length: int | None = None
    cache: str = CacheKind.NONE.value
    teacache_threshold: float = DEFAULT_TEACACHE_THRESHOLD

    def validate(self, limits: Limits = DEFAULT_LIMITS) -> None:
        """Raise InvalidArgumentError naming the first field out of range."""
        found = self.violations(limits)
        if found:
            raise found[0]

    def violations(self, limits: Limits = DEFAULT_LIMITS) -> list[InvalidArgumentError]:
        """Every field out of its documented range, in field order (the API reports them all at once)."""
        found: list[InvalidArgumentError] = []

        def bad(name: str, message: str) -> None:
            found.append(InvalidArgumentError(name, message))

        if not isinstance(self.prompt, str) or is_blank(self.prompt):
            bad("prompt", "must have visible text (white space and characters that show nothing alone are empty)")
        for name in ("prompt", "negative_prompt"):
            if len(getattr(self, name)) > limits.max_prompt_chars:
                bad(name, f"longer than {limits.max_prompt_chars} characters")
        if len(self.images) > limits.max_input_images:
            bad("images", f"at most {limits.max_input_images} input images, got {len(self.images)}")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and not 1 <= value <= limits.max_side:
                bad(name, f"must be in [1, {limits.max_side}], got {value}")
        if not 1 <= self.steps <= limits.max_steps:
            bad("steps", f"must be in [1, {limits.max_steps}], got {self.steps}")
        for name in ("text_guidance_scale", "image_guidance_scale"):
            value = getattr(self, name)
            if not math.isfinite(value) or not 0.0 <= value <= limits.max_guidance:
                bad(name, f"must be a finite number in [0, {limits.max_guidance}], got {value}")
        start, end = self.cfg_range
        if not (math.isfinite(start) and math.isfinite(end) and 0.0 <= start <= end <= 1.0):
            bad("cfg_range", f"must satisfy 0 <= start <= end <= 1, got {self.cfg_range}")
        if self.scheduler not in {k.value for k in SchedulerKind}:
            choices = ", ".join(k.value for k in SchedulerKind)
            bad("scheduler", f"unknown scheduler {self.scheduler!r}; one of {choices}")
        if not 0 <= self.seed <= MAX_SEED:
            bad("seed", f"{SEED_RANGE}, got {self.seed}")
        if not 1 <= self.num_images_per_prompt <= limits.max_images_per_prompt:
            bound, got = limits.max_images_per_prompt, self.num_images_per_prompt
            bad("num_images_per_prompt", f"must be in [1, {bound}], got {got}")
        if not MIN_MAX_PIXELS <= self.max_pixels <= limits.max_pixels:
            bad("max_pixels", f"must be in [{MIN_MAX_PIXELS}, {limits.max_pixels}], got {self.max_pixels}")
        if not MIN_INPUT_IMAGE_SIDE <= self.max_input_image_side_length <= limits.max_side:
            got, side = self.max_input_image_side_length, (MIN_INPUT_IMAGE_SIDE, limits.max_side)
            bad("max_input_image_side_length", f"must be in [{side[0]}, {side[1]}], got {got}")
        if self.max_sequence_length is not None and not 1 <= self.max_sequence_length <= limits.max_sequence_length:
            got = self.max_sequence_length
            bad("max_sequence_length", f"must be in [1, {limits.max_sequence_length}], got {got}")
        if self.cache not in {k.value for k in CacheKind}:
            choices = ", ".join(k.value for k in CacheKind)
            bad("cache", f"unknown cache {self.cache!r}; one of {choices}")
        threshold = self.teacache_threshold
        if not math.isfinite(threshold) or not 0.0 < threshold <= MAX_TEACACHE_THRESHOLD:
            bad("teacache_threshold", f"must be in (0, {MAX_TEACACHE_THRESHOLD}], got {threshold}")
        return found

    def sequence_length(self, text_positions: int) -> int:
        """The truncation length for a checkpoint with `text_positions` text positions (axes_lens[0])."""
        if self.max_sequence_length is None:
            return min(DEFAULT_MAX_SEQUENCE_LENGTH, text_positions)
        if self.max_sequence_length > text_positions:
            raise InvalidArgumentError(
                "max_sequence_length",
                f"the served checkpoint takes at most {text_positions} text tokens, got {self.max_sequence_length}",
            )
        return self.max_sequence_length


_FIELD_TYPES: dict[str, type] = {"prompt": str, "negative_prompt": str, "scheduler": str, "cache": str}
_INT_FIELDS = {
    "width",
    "height",
    "steps",
    "seed",
    "num_images_per_prompt",
    "max_pixels",
    "max_input_image_side_length",
    "max_sequence_length",
}
_FLOAT_FIELDS = {"text_guidance_scale", "image_guidance_scale", "teacache_threshold"}


def random_seed() -> int:
    """A seed in [0, 2^53): any in [0, MAX_SEED] is taken from callers, but a drawn one survives JSON's doubles."""
    return secrets.randbelow(RANDOM_SEEDS)


def request_from_params(params: Mapping[str, Any], images: list[Image.Image] | None = None) -> GenerationRequest:
    """Build a request from JSON-like parameters (the BLS wire format); absent fields take the defaults.

    A missing or null seed draws a random one, which the response reports.
    """
    known = {f.name for f in fields(GenerationRequest)} - {"images"}
    for name in params:
        if name not in known:
            raise InvalidArgumentError(name, "unknown field")
    values: dict[str, Any] = {}
    for name, value in params.items():
        if value is None:
            continue
        if name in _INT_FIELDS:
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidArgumentError(name, f"must be an integer, got {value!r}")
        elif name in _FLOAT_FIELDS:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InvalidArgumentError(name, f"must be a number, got {value!r}")
            value = float(value)
        elif name == "cfg_range":
            if not isinstance(value, list | tuple) or len(value) != 2:
                raise InvalidArgumentError(name, "must be [start, end]")
            if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
                raise InvalidArgumentError(name, "must be two numbers")
            value = (float(value[0]), float(value[1]))
        elif not isinstance(value, _FIELD_TYPES[name]):
            raise InvalidArgumentError(name, f"must be a string, got {type(value).__name__}")
        values[name] = value
    if "prompt" not in values:
        raise InvalidArgumentError("prompt", "is required")
    values.setdefault("seed", random_seed())
    return GenerationRequest(images=list(images or []), **values)

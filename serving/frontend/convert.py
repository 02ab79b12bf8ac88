"""API messages <-> the BLS wire format: field validation, defaults, output encoding, model info."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from omnigen2.v1 import omnigen2_pb2 as pb

from serving.errors import InvalidArgumentError
from serving.frontend.status import invalid_argument
from serving.pipeline.images import decode_image, to_pil
from serving.pipeline.request import GenerationRequest, Limits, random_seed
from serving.pipeline.schedulers import SchedulerKind

SCHEDULERS = {
    pb.SCHEDULER_UNSPECIFIED: SchedulerKind.EULER,
    pb.SCHEDULER_EULER: SchedulerKind.EULER,
    pb.SCHEDULER_DPMSOLVER: SchedulerKind.DPMSOLVER,
}
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

    @property
    def seed(self) -> int:
        return int(self.params["seed"])

    def request_json(self) -> bytes:
        return json.dumps(self.params | {"preview": self.previews}).encode()


def to_forward(request: pb.GenerateRequest, limits: Limits) -> Forward:
    """Validate every field (all violations reported together) and fill in the defaults."""
    violations: list[tuple[str, str]] = []

    images = []
    if len(request.input_images) > limits.max_input_images:
        violations.append(
            ("input_images", f"at most {limits.max_input_images} images, got {len(request.input_images)}")
        )
    else:
        for i, image in enumerate(request.input_images):
            try:
                images.append(decode_image(image.data, f"input_images[{i}].data", limits.max_input_image_pixels))
            except InvalidArgumentError as exc:
                violations.append((exc.field, exc.description))

    scheduler = SCHEDULERS.get(request.scheduler)
    if scheduler is None:
        violations.append(("scheduler", f"unknown value {request.scheduler}"))
    values = {name: getattr(request, name) if request.HasField(name) else getattr(DEFAULTS, name) for name in _OPTIONAL}
    cfg_range = (
        (request.cfg_range.start, request.cfg_range.end) if request.HasField("cfg_range") else DEFAULTS.cfg_range
    )
    generation = GenerationRequest(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        images=images,
        cfg_range=cfg_range,
        seed=request.seed if request.HasField("seed") else random_seed(),
        scheduler=(scheduler or SchedulerKind.EULER).value,
        **values,
    )
    violations += [(API_FIELD.get(e.field, e.field), e.description) for e in generation.violations(limits)]

    output_format = FORMATS.get(request.output_format)
    if output_format is None:
        violations.append(("output_format", f"unknown value {request.output_format}"))
    quality = request.quality if request.HasField("quality") else DEFAULT_QUALITY
    if not 1 <= quality <= 100:
        violations.append(("quality", f"must be in [1, 100], got {quality}"))
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
        return_latents=request.return_latents,
    )


def encode_images(images: np.ndarray, output_format: str, quality: int) -> list[pb.Image]:
    """Float NHWC images in [0, 1] -> encoded images (8-bit, rounded)."""
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


def request_defaults() -> pb.GenerateRequest:
    """The values unset fields take (width/height stay unset: they depend on the input images)."""
    return pb.GenerateRequest(
        negative_prompt=DEFAULTS.negative_prompt,
        steps=DEFAULTS.steps,
        text_guidance_scale=DEFAULTS.text_guidance_scale,
        image_guidance_scale=DEFAULTS.image_guidance_scale,
        cfg_range=pb.CfgRange(start=DEFAULTS.cfg_range[0], end=DEFAULTS.cfg_range[1]),
        scheduler=pb.SCHEDULER_EULER,
        num_images_per_prompt=DEFAULTS.num_images_per_prompt,
        max_pixels=DEFAULTS.max_pixels,
        max_input_image_side_length=DEFAULTS.max_input_image_side_length,
        output_format=pb.IMAGE_FORMAT_PNG,
        quality=DEFAULT_QUALITY,
    )


def api_limits(limits: Limits, max_request_bytes: int, max_in_flight: int) -> pb.Limits:
    return pb.Limits(
        max_input_images=limits.max_input_images,
        max_steps=limits.max_steps,
        max_side=limits.max_side,
        max_pixels=limits.max_pixels,
        max_images_per_prompt=limits.max_images_per_prompt,
        max_guidance_scale=limits.max_guidance,
        max_prompt_chars=limits.max_prompt_chars,
        max_input_image_pixels=limits.max_input_image_pixels,
        max_request_bytes=max_request_bytes,
        max_concurrent_requests=max_in_flight,
    )

"""GetModelInfo's messages: the limits, defaults, budgets and safety stages a caller can read before calling, from the
front end's settings and the served BLS model's parameters."""

from __future__ import annotations

import json
from collections.abc import Mapping

from omnigen2.limits import MIN_VISION_PIXELS
from omnigen2.v1 import omnigen2_pb2 as pb

from serving.frontend.config import FrontendConfig
from serving.frontend.convert import API_STEP_CACHES, CHAT_DEFAULTS, CHAT_OPTIONAL, DEFAULT_QUALITY, DEFAULTS
from serving.pipeline.chat_request import ChatLimits
from serving.pipeline.request import DEFAULT_MAX_SEQUENCE_LENGTH, Limits


def served_sequence_length(model_parameters: Mapping[str, str], limits: Limits) -> int:
    """The most prompt tokens a request may keep: the served checkpoint's text positions (from the BLS's `spec`),
    within the front end's static bound."""
    spec = json.loads(model_parameters.get("spec", "{}"))
    return min(int(spec.get("text_positions", limits.max_sequence_length)), limits.max_sequence_length)


def served_step_caches(model_parameters: dict[str, str]) -> list[pb.StepCache]:
    """The cache modes a request may ask for: all of them where the transformer keeps cache state (the BLS's
    `step_cache_value_bytes`), only NONE where it does not (TensorRT engines: a cache request runs uncached)."""
    if int(model_parameters.get("step_cache_value_bytes", "0")):
        return list(API_STEP_CACHES.values())
    return [pb.STEP_CACHE_NONE]


def served_safety(model_parameters: Mapping[str, str], prompt_policy: bool) -> pb.SafetyInfo:
    """The safety stages in force: the front end's prompt policy, and the output classifier the BLS runs when its
    `safety` parameter holds the operator's settings (serving/safety/settings.py, as JSON)."""
    thresholds = json.loads(model_parameters["safety"])["thresholds"] if "safety" in model_parameters else {}
    return pb.SafetyInfo(
        prompt_policy=prompt_policy, output_classifier="safety" in model_parameters, output_thresholds=thresholds
    )


def request_defaults(max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH) -> pb.GenerateRequest:
    """The values unset fields take (width/height stay unset: they depend on the input images).

    `max_sequence_length` is the served limit: the default length is 1024, or that limit if lower."""
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
        max_sequence_length=min(DEFAULT_MAX_SEQUENCE_LENGTH, max_sequence_length),
        cache=pb.STEP_CACHE_NONE,
        teacache_threshold=DEFAULTS.teacache_threshold,
        output_format=pb.IMAGE_FORMAT_PNG,
        quality=DEFAULT_QUALITY,
    )


def api_limits(limits: Limits, max_request_bytes: int, max_in_flight: int, max_sequence_length: int) -> pb.Limits:
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
        max_sequence_length=max_sequence_length,
    )


def understand_limits(limits: ChatLimits) -> pb.UnderstandLimits:
    return pb.UnderstandLimits(
        max_messages=limits.max_messages,
        max_images=limits.max_images,
        max_text_chars=limits.max_text_chars,
        max_prompt_tokens=limits.max_prompt_tokens,
        max_new_tokens=limits.max_new_tokens,
        max_pixels=limits.max_vision_pixels,
        max_stop_strings=limits.max_stop_strings,
        min_pixels=MIN_VISION_PIXELS,
    )


def understand_defaults() -> pb.UnderstandRequest:
    return pb.UnderstandRequest(**{name: getattr(CHAT_DEFAULTS, name) for name in CHAT_OPTIONAL})


def api_budgets(config: FrontendConfig) -> pb.Budgets:
    return pb.Budgets(
        max_output_bytes=config.max_response_bytes,
        max_request_input_pixels=config.max_request_input_pixels,
        max_sample_tokens=config.max_sample_tokens,
        max_step_tokens=config.max_step_tokens,
        max_request_tokens=config.max_request_tokens,
        max_inflight_input_pixels=config.max_inflight_input_pixels,
        max_inflight_step_tokens=config.max_inflight_step_tokens,
        max_run_seconds=config.max_run_s,
        max_chat_tokens=config.max_chat_tokens,
        max_inflight_chat_tokens=config.max_inflight_chat_tokens,
        max_inflight_output_pixels=config.max_inflight_output_pixels,
        max_buffered_stream_bytes=config.max_buffered_stream_bytes,
        stop_grace_seconds=config.stop_grace_s,
    )

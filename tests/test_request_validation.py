"""Bad requests raise InvalidArgumentError naming the field, before any model work."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from PIL import Image

from serving.errors import InvalidArgumentError
from serving.frontend.openai_errors import OpenAIError
from serving.frontend.openai_requests import image_call
from serving.pipeline.chat_request import ChatMessage, ChatPart, ChatRequest
from serving.pipeline.eager import OmniGen2Pipeline
from serving.pipeline.request import GenerationRequest

VALID = GenerationRequest(prompt="a red car", width=64, height=64, steps=2)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"images": [Image.new("RGB", (32, 32))] * 6}, "images"),
        ({"width": 0}, "width"),
        ({"height": -16}, "height"),
        ({"width": 100_000}, "width"),
        ({"scheduler": "ddim"}, "scheduler"),
        ({"steps": 0}, "steps"),
        ({"steps": 10_000}, "steps"),
        ({"prompt": "  "}, "prompt"),
        ({"prompt": "\u200b\u200c\u200d\u2060\ufeff"}, "prompt"),  # zero-width characters only: nothing shows
        ({"prompt": " \u200b\n\ufeff "}, "prompt"),
        ({"prompt": "\u3164\u3164"}, "prompt"),  # Hangul filler (a letter, Lo)
        ({"prompt": "\u2800 \u115f\u034f\ufe0f\x00\u0301"}, "prompt"),  # braille blank, CGJ, VS16, NUL, a lone mark
        ({"text_guidance_scale": float("nan")}, "text_guidance_scale"),
        ({"image_guidance_scale": -1.0}, "image_guidance_scale"),
        ({"cfg_range": (0.8, 0.2)}, "cfg_range"),
        ({"seed": -1}, "seed"),
        ({"num_images_per_prompt": 0}, "num_images_per_prompt"),
        ({"max_pixels": 10}, "max_pixels"),
        ({"max_sequence_length": 0}, "max_sequence_length"),
        ({"max_sequence_length": 1025}, "max_sequence_length"),
    ],
)
def test_invalid_field_is_named(change: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgumentError) as err:
        dataclasses.replace(VALID, **change).validate()
    assert err.value.field == field


def test_zero_width_characters_beside_text_are_kept() -> None:
    assert dataclasses.replace(VALID, prompt="\u200ba cat\u200d").violations() == []
    assert dataclasses.replace(VALID, prompt="\u3164\u0301e").violations() == []


def test_the_seed_range_is_one_message_over_grpc_and_http() -> None:
    expected = "must be an integer in [0, 9223372036854775807], got"
    (service,) = dataclasses.replace(VALID, seed=-1).violations()
    assert service.field == "seed" and service.description == f"{expected} -1"
    (chat,) = ChatRequest(messages=[ChatMessage("user", [ChatPart(text="hi")])], seed=-1).violations()
    assert chat.description == f"{expected} -1"
    for seed in (-1, 2**63):
        with pytest.raises(OpenAIError) as refused:
            image_call({"prompt": "a cat", "seed": seed}, [])
        assert refused.value.message == f"seed: {expected} {seed}"


def test_pipeline_validates_before_running(golden_pipeline: OmniGen2Pipeline) -> None:
    with pytest.raises(InvalidArgumentError, match="steps"):
        golden_pipeline(dataclasses.replace(VALID, steps=0))


def test_valid_request_runs_with_several_images_per_prompt(golden_pipeline: OmniGen2Pipeline) -> None:
    result = golden_pipeline(dataclasses.replace(VALID, num_images_per_prompt=2, width=40, height=24))
    assert result.images.shape == (2, 24, 40, 3)  # generated at 32x16, resized to the requested size
    assert result.latents.shape == (2, 16, 2, 4)


def test_max_sequence_length_is_bounded_by_the_checkpoints_text_positions(golden_pipeline: OmniGen2Pipeline) -> None:
    assert VALID.sequence_length(text_positions=512) == 512  # the default 1024, capped at the checkpoint's
    assert VALID.sequence_length(text_positions=2048) == 1024
    assert dataclasses.replace(VALID, max_sequence_length=512).sequence_length(512) == 512
    with pytest.raises(InvalidArgumentError) as err:
        golden_pipeline(dataclasses.replace(VALID, max_sequence_length=513))  # tiny: axes_lens[0] = 512
    assert err.value.field == "max_sequence_length" and "512" in err.value.description

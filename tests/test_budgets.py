"""The default budgets against the requests they are meant to admit and refuse (serving/frontend/budgets.py)."""

from __future__ import annotations

import io

import grpc
import pytest
from omnigen2.v1 import omnigen2_pb2 as pb
from PIL import Image

from serving.frontend.admission import Admission, Load
from serving.frontend.budgets import check_budgets, generation_load, inflight_budgets
from serving.frontend.config import FrontendConfig
from serving.frontend.convert import to_forward
from serving.frontend.metrics import Metrics
from serving.frontend.status import ApiError
from serving.pipeline.request import DEFAULT_LIMITS

PROMPT = "Put the cat from the first image on the sofa from the second, in the light of the third"


def _png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), 90).save(buffer, format="PNG")
    return buffer.getvalue()


def _request(references: int, side: int, **fields: object) -> pb.GenerateRequest:
    images = [pb.Image(data=_png(1024)) for _ in range(references)]
    return pb.GenerateRequest(prompt=PROMPT, input_images=images, width=side, height=side, **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "request_",
    [
        _request(3, 1024),  # composition: 3 x 4096 reference tokens + 4096 image tokens + text, three CFG branches
        _request(1, 1024, num_images_per_prompt=1),  # an edit
        _request(0, 1024, num_images_per_prompt=4),  # four 1024x1024 images at once
        # The issue's 2048x2048 (16.4k tokens a sample): admitted, and bounded by the BLS's call cap and tiled decoding.
        _request(0, 2048, max_pixels=2048 * 2048, text_guidance_scale=1.0),
    ],
)
def test_realistic_requests_fit_the_default_budgets(request_: pb.GenerateRequest) -> None:
    check_budgets(to_forward(request_, DEFAULT_LIMITS), FrontendConfig())


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (_request(1, 1024, num_images_per_prompt=8), "num_images_per_prompt"),  # 8 x 3 branches of 8k tokens
        (_request(5, 1024), "max_input_image_side_length"),  # five 1024x1024 references: 24k tokens a sample
        (_request(0, 1024, num_images_per_prompt=8), "num_images_per_prompt"),  # 8 x 2 branches of 4.2k tokens
    ],
)
def test_the_issues_heavy_requests_are_refused_by_default(request_: pb.GenerateRequest, field: str) -> None:
    with pytest.raises(ApiError) as raised:
        check_budgets(to_forward(request_, DEFAULT_LIMITS), FrontendConfig())
    assert field in raised.value.status.details


# The attack: 8 images generated at 256x256 in one step, delivered at 4096x4096 (134 M output pixels). Its 2.6k
# tokens a step pass every token budget; the stack held about 4.6 GB more while one ran.
OUTPUT_FLOOD = pb.GenerateRequest(
    prompt="noise", width=4096, height=4096, max_pixels=65536, num_images_per_prompt=8, steps=1, text_guidance_scale=1.0
)


def test_output_pixels_in_flight_are_bounded_not_only_per_request() -> None:
    config = FrontendConfig()
    forward = to_forward(OUTPUT_FLOOD, DEFAULT_LIMITS)
    check_budgets(forward, config)  # the largest output the limits allow fits alone
    admission = Admission(config.max_in_flight, inflight_budgets(config), config.retry_after_s, Metrics())
    with admission.reserve(generation_load(forward)):
        assert admission.held.output_pixels == 8 * 4096 * 4096
        with pytest.raises(ApiError) as raised, admission.reserve(generation_load(forward)):
            pass
        assert raised.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "output pixels in flight" in raised.value.status.details
        small = pb.GenerateRequest(prompt="cat", width=512, height=512, steps=1)
        with admission.reserve(generation_load(to_forward(small, DEFAULT_LIMITS))):  # room left beside it
            pass
    assert admission.held == Load()


def test_a_request_over_the_output_pixels_in_flight_is_refused_alone() -> None:
    """Admission takes a request alone whatever its cost, so one that could never fit beside others is refused."""
    config = FrontendConfig(max_inflight_output_pixels=100_000_000)
    with pytest.raises(ApiError) as raised:
        check_budgets(to_forward(OUTPUT_FLOOD, DEFAULT_LIMITS), config)
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "num_images_per_prompt" in raised.value.status.details  # one image would fit
    assert "(--max-inflight-output-pixels)" in raised.value.status.details

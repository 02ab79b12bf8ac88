"""The default budgets against the requests they are meant to admit and refuse (serving/frontend/budgets.py)."""

from __future__ import annotations

import io

import pytest
from omnigen2.v1 import omnigen2_pb2 as pb
from PIL import Image

from serving.frontend.budgets import check_budgets
from serving.frontend.config import FrontendConfig
from serving.frontend.convert import to_forward
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

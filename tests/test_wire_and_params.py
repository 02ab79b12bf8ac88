"""Request parameters from JSON, image decoding, and the stream's error format."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from serving.errors import InvalidArgumentError
from serving.pipeline.images import decode_image
from serving.pipeline.request import request_from_params
from serving.triton.wire import WireError


def test_params_take_defaults_and_draw_a_seed() -> None:
    request = request_from_params({"prompt": "a cat", "cfg_range": [0, 0.5]})
    assert request.steps == 50 and request.cfg_range == (0.0, 0.5)
    assert 0 <= request.seed < 2**63
    assert request_from_params({"prompt": "a", "seed": 5}).seed == 5


def test_drawn_seeds_survive_json_doubles() -> None:
    """Drawn seeds stay below 2^53, so JavaScript or jq reading an answer's seed keep it exactly (before: drawn in
    [0, 2^63), 4591024147021620405 read back as 4591024147021620000, another image); callers' seeds stay any int64."""
    seeds = [request_from_params({"prompt": "a"}).seed for _ in range(1000)]
    assert all(0 <= seed < 2**53 and float(seed) == seed for seed in seeds)
    assert len(set(seeds)) > 990
    assert request_from_params({"prompt": "a", "seed": 2**63 - 1}).seed == 2**63 - 1


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({}, "prompt"),
        ({"prompt": "a", "steps": "ten"}, "steps"),
        ({"prompt": "a", "steps": True}, "steps"),
        ({"prompt": "a", "text_guidance_scale": "high"}, "text_guidance_scale"),
        ({"prompt": "a", "cfg_range": [0.1]}, "cfg_range"),
        ({"prompt": 3}, "prompt"),
        ({"prompt": "a", "images": []}, "images"),
        ({"prompt": "a", "guidance": 2}, "guidance"),
    ],
)
def test_bad_params_name_the_field(params: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgumentError) as err:
        request_from_params(params)
    assert err.value.field == field


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_decode_image_converts_and_refuses() -> None:
    assert decode_image(_png(Image.new("RGBA", (20, 10))), "images[0]", 10_000).mode == "RGB"
    for data, reason in [(b"", "empty"), (b"garbage", "decodable"), (_png(Image.new("L", (200, 200))), "limit")]:
        with pytest.raises(InvalidArgumentError, match=reason) as err:
            decode_image(data, "images[1]", 10_000)
        assert err.value.field == "images[1]"


def test_wire_error_round_trip() -> None:
    for error in [WireError("INVALID_ARGUMENT", "must be in [1, 200]", "steps"), WireError("CANCELLED", "by caller")]:
        assert WireError.parse(str(error)) == error
    assert WireError.parse("Segfault in stub").code == "INTERNAL"

"""API messages without a server: the front end's validation and defaults, the SDK's request building."""

from __future__ import annotations

import io
import json
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2, status_pb2
from omnigen2.messages import build_request, encode_image
from omnigen2.v1 import omnigen2_pb2 as pb
from PIL import Image

from serving.frontend.convert import encode_images, to_forward
from serving.frontend.model_info import request_defaults, served_sequence_length
from serving.frontend.status import ApiError, invalid_argument, resource_exhausted
from serving.pipeline.images import to_uint8
from serving.pipeline.request import DEFAULT_LIMITS, GenerationRequest, request_from_params


def _png(size: tuple[int, int] = (32, 24)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_unset_fields_take_the_documented_defaults() -> None:
    forward = to_forward(pb.GenerateRequest(prompt="A cat"), DEFAULT_LIMITS)
    defaults = GenerationRequest(prompt="")
    assert forward.params["steps"] == defaults.steps == request_defaults().steps
    assert forward.params["width"] is None and forward.params["height"] is None
    assert forward.params["cfg_range"] == [0.0, 1.0] and forward.params["scheduler"] == "euler"
    assert 0 <= forward.seed < 2**63  # absent seed: drawn here, so the response can report it
    assert (forward.output_format, forward.quality, forward.previews) == ("PNG", 90, False)


def test_explicit_zero_is_not_unset() -> None:
    with pytest.raises(ApiError) as raised:
        to_forward(pb.GenerateRequest(prompt="A cat", steps=0, seed=0), DEFAULT_LIMITS)
    assert "steps" in raised.value.status.details and "seed" not in raised.value.status.details


def test_seed_zero_reaches_the_denoiser_as_zero() -> None:
    """0 is a seed like any other (the golden cases' seeds are all above 0): it must not be taken for no seed."""
    forward = to_forward(pb.GenerateRequest(prompt="A cat", seed=0), DEFAULT_LIMITS)
    params = json.loads(forward.request_json())
    assert forward.seed == params["seed"] == 0
    params.pop("preview")
    assert request_from_params(params).seed == 0  # the BLS's parse


def test_cfg_range_keeps_decimal_values_exact() -> None:
    """i/N is compared against the range exactly: 0.4 must arrive as 0.4, not as float32's 0.40000000596."""
    request = pb.GenerateRequest(prompt="A cat", cfg_range=pb.CfgRange(start=0.4, end=0.6), text_guidance_scale=4.1)
    params = json.loads(to_forward(request, DEFAULT_LIMITS).request_json())
    assert params["cfg_range"] == [0.4, 0.6] and params["text_guidance_scale"] == 4.1


def test_images_forward_as_sent_and_scheduler_maps() -> None:
    request = pb.GenerateRequest(
        prompt="Edit", input_images=[pb.Image(data=_png())], scheduler=pb.SCHEDULER_DPMSOLVER, seed=9
    )
    forward = to_forward(request, DEFAULT_LIMITS)
    assert forward.images == [_png()] and forward.params["scheduler"] == "dpmsolver++" and forward.seed == 9


def test_every_violation_is_reported_with_its_api_field_name() -> None:
    request = pb.GenerateRequest(prompt=" ", input_images=[pb.Image(data=_png())] * 6, quality=200, output_format=7)
    with pytest.raises(ApiError) as raised:
        to_forward(request, DEFAULT_LIMITS)
    status = raised.value.status
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT
    # The status carries a google.rpc.Status in its trailing metadata, with the BadRequest packed in it.
    packed = status_pb2.Status.FromString(dict(status.trailing_metadata)["grpc-status-details-bin"])
    detail = error_details_pb2.BadRequest()
    assert packed.details[0].Unpack(detail)
    assert [v.field for v in detail.field_violations] == ["input_images", "prompt", "output_format", "quality"]


def test_resource_exhausted_carries_retry_info() -> None:
    status = resource_exhausted("busy", 1.5).status
    packed = status_pb2.Status.FromString(dict(status.trailing_metadata)["grpc-status-details-bin"])
    retry = error_details_pb2.RetryInfo()
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED and packed.details[0].Unpack(retry)
    assert retry.retry_delay.ToNanoseconds() == 1_500_000_000
    assert invalid_argument([("steps", "too many")]).status.details == "steps: too many"


def test_encoded_images_round_trip_8_bit() -> None:
    images = to_uint8(np.random.default_rng(0).random((2, 8, 12, 3), dtype=np.float32))  # as the BLS sends them
    encoded = encode_images(images, "PNG", 90)
    assert [(e.width, e.height, e.mime_type) for e in encoded] == [(12, 8, "image/png")] * 2
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(encoded[1].data))), images[1])


def test_sdk_builds_requests_from_options() -> None:
    request = build_request(
        "A cat",
        [_png(), Image.new("RGB", (16, 16))],
        {"cfg_range": (0.0, 0.6), "scheduler": "dpmsolver", "output_format": "webp", "steps": 7, "seed": 0},
        previews=True,
    )
    assert request.HasField("seed") and request.seed == 0 and request.steps == 7 and request.previews
    assert (request.cfg_range.end, request.scheduler, request.output_format) == (
        0.6,
        pb.SCHEDULER_DPMSOLVER,
        pb.IMAGE_FORMAT_WEBP,
    )
    assert request.input_images[0].data == _png() and Image.open(io.BytesIO(request.input_images[1].data)).size == (
        16,
        16,
    )
    assert not build_request("A cat", [], {}).HasField("width")
    with pytest.raises(ValueError, match="scheduler"):
        build_request("A cat", [], {"scheduler": "ddim"})  # type: ignore[typeddict-item]


def test_sdk_reads_image_files(tmp_path: Path) -> None:
    path = tmp_path / "in.png"
    path.write_bytes(_png())
    assert encode_image(path).data == _png() and encode_image(str(path)).data == _png()


def test_max_sequence_length_forwards_and_the_served_limit_comes_from_the_spec() -> None:
    unset = to_forward(pb.GenerateRequest(prompt="A cat"), DEFAULT_LIMITS)
    assert unset.params["max_sequence_length"] is None  # the BLS picks 1024 or the checkpoint's limit
    explicit = to_forward(build_request("A cat", [], {"max_sequence_length": 256}), DEFAULT_LIMITS)
    assert explicit.params["max_sequence_length"] == 256
    assert served_sequence_length({"spec": json.dumps({"text_positions": 512})}, DEFAULT_LIMITS) == 512
    assert served_sequence_length({"spec": json.dumps({"text_positions": 4096})}, DEFAULT_LIMITS) == 1024
    assert request_defaults(512).max_sequence_length == 512 and request_defaults().max_sequence_length == 1024

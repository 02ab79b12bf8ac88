"""Sizes, pre- and post-processing of images."""

from __future__ import annotations

import io
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from google.rpc import error_details_pb2, status_pb2
from omnigen2.v1 import omnigen2_pb2 as pb
from PIL import Image, ImageOps

from serving.errors import InvalidArgumentError
from serving.frontend.convert import to_forward
from serving.frontend.status import ApiError
from serving.pipeline.image_tensors import postprocess, preprocess_image
from serving.pipeline.images import decode_image, fit_size, generation_size, to_pil, to_uint8
from serving.pipeline.request import DEFAULT_LIMITS, GenerationRequest


def test_fit_size_never_upscales_and_floors_to_16() -> None:
    assert fit_size(64, 80, 1024 * 1024, 1024) == (64, 80)
    assert fit_size(70, 90, 1024 * 1024, 1024) == (64, 80)
    assert fit_size(2000, 1000, 1024 * 1024, 1024) == (1024, 512)  # side limit wins
    h, w = fit_size(1500, 1500, 512 * 512, 4096)
    assert (h, w) == (512, 512)


def test_generation_size_rules() -> None:
    assert generation_size(None, None, 1024 * 1024, [(64, 80)]) == ((64, 80), (64, 80))
    assert generation_size(96, 64, 1024 * 1024, []) == ((64, 96), (64, 96))
    assert generation_size(None, None, 1024 * 1024, []) == ((1024, 1024), (1024, 1024))
    # Not multiples of 16 or above max_pixels: valid, generated smaller and resized back.
    assert generation_size(100, 50, 1024 * 1024, []) == ((48, 96), (50, 100))
    assert generation_size(2048, 2048, 1024 * 1024, [(64, 64), (64, 64)]) == ((1024, 1024), (2048, 2048))
    # Sides of 1-15 px: generated at 16 and resized down, the other side kept inside max_pixels.
    assert generation_size(8, 64, 1024 * 1024, []) == ((64, 16), (64, 8))
    assert generation_size(1, 1, 1024 * 1024, []) == ((16, 16), (1, 1))
    assert generation_size(4096, 1, 256, []) == ((16, 16), (1, 4096))


def test_preprocess_converts_resizes_and_normalises() -> None:
    image = Image.new("RGBA", (50, 40), (255, 0, 0, 128))
    tensor = preprocess_image(image, 1024 * 1024, 1024)
    assert tensor.shape == (1, 3, 32, 48)
    assert tensor[0, 0].max().item() == pytest.approx(1.0) and tensor[0, 1].min().item() == pytest.approx(-1.0)
    with pytest.raises(InvalidArgumentError, match=r"resized to 10x100 .* must reach 16 px"):
        preprocess_image(Image.new("RGB", (10, 100)), 1024 * 1024, 1024, field="images[2]")


def test_reference_images_are_shrunk_with_lanczos(golden: Path) -> None:
    """The reference's image processor resamples with Lanczos. The golden inputs are already multiples of 16 within
    the limits, so the golden parity never resizes one: another filter passed every test."""
    image = Image.open(golden / "in_context_two_images_input1.png").convert("RGB")  # 48x80
    tensor = preprocess_image(image, 1024 * 1024, 64)  # side 80 -> 64: 38.4 x 64, floored to 32 x 64
    expected = np.asarray(image.resize((32, 64), resample=Image.Resampling.LANCZOS), dtype=np.float32) / 127.5 - 1
    np.testing.assert_allclose(tensor[0].permute(1, 2, 0).numpy(), expected, atol=1e-6)


def test_too_small_names_the_size_after_the_resize() -> None:
    """A 16x4096 strip is 16 px wide as sent; the side limit makes it 8x2048, and that is what is refused."""
    with pytest.raises(InvalidArgumentError, match=r"16x4096 is resized to 8x2048 .* resized image must reach 16 px"):
        preprocess_image(Image.new("RGB", (16, 4096)), 1024 * 1024, 2048, field="input_images[0].data")


def test_postprocess_resizes_clamps_and_round_trips_to_pil() -> None:
    decoded = torch.linspace(-2, 2, 3 * 16 * 16).reshape(1, 3, 16, 16)
    out = postprocess(decoded, 20, 24)
    assert out.shape == (1, 20, 24, 3) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    (pil,) = to_pil(to_uint8(out))
    assert pil.size == (24, 20) and pil.mode == "RGB"


def test_postprocess_resizes_bilinearly_between_pixel_centres() -> None:
    """DESIGN.md: the generated image is resized (bilinear) to the requested size. Every golden case is generated at
    its output size, so the golden parity never resizes: a nearest or corner-aligned resize would pass it."""
    black_white = torch.tensor([-1.0, 1.0]).reshape(1, 1, 1, 2).expand(1, 3, 1, 2)
    out = postprocess(black_white, 1, 4)
    assert out[0, 0, :, 0].tolist() == pytest.approx([0.0, 0.25, 0.75, 1.0])


def _encoded(image: Image.Image, format: str = "PNG", **options: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, format=format, **options)
    return out.getvalue()


def _with_orientation(image: Image.Image, orientation: int, format: str = "PNG") -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encoded(image, format, exif=exif.tobytes())


@pytest.fixture
def bls(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """serving.triton.bls without Triton: a stand-in for the Python backend's utilities module."""
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", types.ModuleType("triton_python_backend_utils"))
    monkeypatch.delitem(sys.modules, "serving.triton.bls", raising=False)
    import serving.triton.bls as module

    return module


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_agrees_in_front_end_sizes_and_bls_pixels(bls: types.ModuleType, orientation: int) -> None:
    """An image stored sideways with an EXIF orientation is served exactly as the same image stored upright."""
    stored = Image.fromarray(np.random.default_rng(orientation).integers(0, 256, (96, 160, 3), dtype=np.uint8))
    rotated = _with_orientation(stored, orientation)
    upright = _encoded(ImageOps.exif_transpose(Image.open(io.BytesIO(rotated))))
    assert Image.open(io.BytesIO(upright)).size == ((96, 160) if orientation >= 5 else (160, 96))

    def forward(data: bytes) -> Any:
        return to_forward(pb.GenerateRequest(prompt="a cat", input_images=[pb.Image(data=data)]), DEFAULT_LIMITS)

    assert forward(rotated).cost == forward(upright).cost  # the header's size, oriented: costs and budgets agree
    generation = GenerationRequest(prompt="a cat")
    np.testing.assert_array_equal(
        bls._reference_pixels(rotated, "input_images[0].data", generation, DEFAULT_LIMITS).numpy(),
        bls._reference_pixels(upright, "input_images[0].data", generation, DEFAULT_LIMITS).numpy(),
    )


def test_exif_orientation_of_a_jpeg_phone_photo() -> None:
    stored = Image.new("RGB", (160, 96), "red")
    stored.paste((0, 0, 255), (0, 0, 16, 96))  # blue on the stored left: on top once turned (orientation 6)
    photo = decode_image(_with_orientation(stored, 6, "JPEG"), "input_images[0].data", DEFAULT_LIMITS.max_pixels)
    assert photo.size == (96, 160)
    red, _, blue = photo.getpixel((48, 4))
    assert blue > 200 and red < 60


def test_float_images_are_refused_naming_the_field() -> None:
    data = _encoded(Image.fromarray(np.random.default_rng(0).random((64, 64), dtype=np.float32)), "TIFF")
    with pytest.raises(InvalidArgumentError, match="floating-point") as refused:
        decode_image(data, "input_images[0].data", DEFAULT_LIMITS.max_pixels)
    assert refused.value.field == "input_images[0].data"
    with pytest.raises(ApiError, match=r"input_images\[0\]\.data.*floating-point"):
        to_forward(pb.GenerateRequest(prompt="a cat", input_images=[pb.Image(data=data)]), DEFAULT_LIMITS)


def _violations(error: ApiError) -> list[str]:
    """The fields of a refusal's google.rpc.BadRequest, in order."""
    details = status_pb2.Status.FromString(dict(error.status.trailing_metadata)["grpc-status-details-bin"])
    request = error_details_pb2.BadRequest()
    details.details[0].Unpack(request)
    return [violation.field for violation in request.field_violations]


def test_every_input_image_too_small_for_the_model_is_named_up_front() -> None:
    """At side length 16, 112x35 and 117x40 both become 16x5: the front end names both, in order, from their
    headers (the model would stop at whichever it resized first); a header that does not read is named first."""
    small = [_encoded(Image.new("RGB", size)) for size in ((112, 35), (117, 40))]
    request = pb.GenerateRequest(
        prompt="a cat", input_images=[pb.Image(data=data) for data in [*small, b"not an image"]]
    )
    request.max_input_image_side_length = 16
    with pytest.raises(ApiError, match=r"117x40 is resized to 16x5 .* must reach 16 px") as refused:
        to_forward(request, DEFAULT_LIMITS)
    assert _violations(refused.value) == ["input_images[2].data", "input_images[0].data", "input_images[1].data"]
    del request.input_images[2]
    request.max_input_image_side_length = 64  # 64x20 and 64x21: both fit
    to_forward(request, DEFAULT_LIMITS)
    # A bad budget is named alone: the images are not measured against it.
    request.max_input_image_side_length = 0
    with pytest.raises(ApiError) as refused:
        to_forward(request, DEFAULT_LIMITS)
    assert _violations(refused.value) == ["max_input_image_side_length"]

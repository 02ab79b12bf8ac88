"""Input images: the formats decoded, and JPEGs refused by their scan count before any pixel is decoded."""

from __future__ import annotations

import io
import time
from typing import Any

import numpy as np
import pytest
from omnigen2.v1 import omnigen2_pb2 as pb
from PIL import Image

from serving.errors import InvalidArgumentError
from serving.frontend.convert import to_chat_forward, to_forward
from serving.frontend.status import ApiError
from serving.pipeline import jpeg
from serving.pipeline.chat_request import DEFAULT_CHAT_LIMITS
from serving.pipeline.images import INPUT_FORMATS, decode_image
from serving.pipeline.request import DEFAULT_LIMITS
from tests.jpeg_bombs import scan_bomb, segments

FIELD = "input_images[0].data"
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n0 0 moveto 64 64 lineto stroke\nshowpage\n"


def _encoded(image: Image.Image, format: str, **options: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, format=format, **options)
    return out.getvalue()


def _noise(width: int = 64, height: int = 48) -> Image.Image:
    """Random pixels: the entropy-coded data holds 0xFF bytes (stuffed as 0xFF00)."""
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_scan_count_of_ordinary_jpegs() -> None:
    assert jpeg.scan_count(_encoded(_noise(), "JPEG")) == 1
    assert jpeg.scan_count(_encoded(_noise(), "JPEG", progressive=True)) == 10  # libjpeg's script for colour
    assert jpeg.scan_count(_encoded(_noise(), "JPEG", restart_marker_blocks=1)) == 1  # RST0-7 inside the scan
    assert jpeg.scan_count(_encoded(_noise(), "PNG")) == 0


def test_scan_count_skips_jpegs_in_metadata_and_sees_scans_behind_garbage() -> None:
    bomb = scan_bomb(300, side=16)
    assert jpeg.scan_count(bomb) == jpeg.MAX_SCANS + 1  # counting stops past the limit
    assert jpeg.scan_count(bomb, stop_after=1000) == 300
    # A bomb inside an APP1 (EXIF) segment is data, not scans of the image.
    assert jpeg.scan_count(_encoded(_noise(), "JPEG", exif=b"Exif\x00\x00" + bomb)) == 1
    # Bytes between segments are skipped by libjpeg (a warning): hidden scans still count, and still decode.
    parts = segments(bomb)
    scan = parts.index(next(s for s in parts if s[1] == 0xDA))
    hidden = jpeg.SIGNATURE + b"".join(parts[:scan]) + b"\x00\xff\x00junk\xff\xff" + b"".join(parts[scan:])
    Image.open(io.BytesIO(hidden)).load()
    assert jpeg.scan_count(hidden, stop_after=1000) == 300


def test_a_scan_bomb_is_refused_before_decoding_in_the_front_end_and_the_decoder() -> None:
    bomb = scan_bomb(5000, side=2048)  # 97 KB; decoding it took 33 s
    started = time.perf_counter()
    with pytest.raises(InvalidArgumentError, match=f"more than {jpeg.MAX_SCANS} scans") as refused:
        decode_image(bomb, FIELD, DEFAULT_LIMITS.max_input_image_pixels)
    assert refused.value.field == FIELD
    with pytest.raises(ApiError, match=r"input_images\[0\]\.data.*more than 100 scans"):
        to_forward(pb.GenerateRequest(prompt="a cat", input_images=[pb.Image(data=bomb)]), DEFAULT_LIMITS)
    chat = pb.UnderstandRequest(
        messages=[pb.ChatMessage(role=pb.ROLE_USER, content=[pb.ContentPart(image=pb.Image(data=bomb))])]
    )
    with pytest.raises(ApiError, match=r"messages\[0\]\.content\[0\]\.image.*more than 100 scans"):
        to_chat_forward(chat, DEFAULT_CHAT_LIMITS)
    assert time.perf_counter() - started < 1.0


def test_scans_up_to_the_limit_decode() -> None:
    image = decode_image(scan_bomb(jpeg.MAX_SCANS, side=64), FIELD, DEFAULT_LIMITS.max_input_image_pixels)
    assert image.size == (64, 64)


@pytest.mark.parametrize("format", INPUT_FORMATS)
def test_the_documented_formats_decode(format: str) -> None:
    assert decode_image(_encoded(_noise(), format), FIELD, DEFAULT_LIMITS.max_input_image_pixels).size == (64, 48)


def test_a_multi_picture_jpeg_decodes_its_first_picture() -> None:
    data = _encoded(_noise(), "MPO", save_all=True, append_images=[Image.new("RGB", (64, 48))])
    assert decode_image(data, FIELD, DEFAULT_LIMITS.max_input_image_pixels).getpixel((0, 0)) != (0, 0, 0)


@pytest.mark.parametrize(
    "data",
    [EPS, _encoded(_noise(), "ICO"), _encoded(_noise(), "TGA"), _encoded(_noise(), "PPM")],
    ids=["eps", "ico", "tga", "ppm"],
)
def test_other_formats_are_refused_unread(data: bytes) -> None:
    with pytest.raises(InvalidArgumentError, match=r"not a decodable image.*accepted: PNG, JPEG") as refused:
        decode_image(data, FIELD, DEFAULT_LIMITS.max_input_image_pixels)
    assert refused.value.field == FIELD

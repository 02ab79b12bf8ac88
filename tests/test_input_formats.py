"""Input images: the formats decoded, and JPEGs refused by their scan count before any pixel is decoded."""

from __future__ import annotations

import asyncio
import gc
import io
import struct
import sys
import time
import traceback
import zlib
from concurrent.futures import ThreadPoolExecutor
from types import FrameType
from typing import Any
from unittest import mock

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
from serving.pipeline.tiff import MAX_TILE_PIXELS
from serving.triton.tasks import gather_or_cancel
from tests.jpeg_bombs import scan_bomb, segments
from tests.tiff_bombs import TILE_BOMB, tiff

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
    assert jpeg.walk(_encoded(_noise(), "JPEG"))[0] == 1
    assert jpeg.walk(_encoded(_noise(), "JPEG", progressive=True))[0] == 10  # libjpeg's script for colour
    plain = jpeg.walk(_encoded(_noise(), "JPEG"))[1]
    restarts = _encoded(_noise(), "JPEG", restart_marker_blocks=1)  # RST0-7 in the scan: not steps of the walk
    assert jpeg.walk(restarts) == (1, plain + 1, 0)  # one more marker: DRI
    assert jpeg.walk(_encoded(_noise(), "PNG")) == (0, 0, 0)


def test_scan_count_skips_jpegs_in_metadata_and_sees_scans_behind_garbage() -> None:
    bomb = scan_bomb(300, side=16)
    assert jpeg.walk(bomb)[0] == jpeg.MAX_SCANS + 1  # counting stops past the limit
    assert jpeg.walk(bomb, max_scans=1000)[0] == 300
    # A bomb inside an APP1 (EXIF) segment is data, not scans of the image.
    assert jpeg.walk(_encoded(_noise(), "JPEG", exif=b"Exif\x00\x00" + bomb))[0] == 1
    # Bytes between segments are skipped by libjpeg (a warning): hidden scans still count, and still decode.
    parts = segments(bomb)
    scan = parts.index(next(s for s in parts if s[1] == 0xDA))
    hidden = jpeg.SIGNATURE + b"".join(parts[:scan]) + b"\x00\xff\x00junk\xff\xff" + b"".join(parts[scan:])
    Image.open(io.BytesIO(hidden)).load()
    assert jpeg.walk(hidden, max_scans=1000)[0] == 300


def test_a_scan_bomb_is_refused_before_decoding_in_the_front_end_and_the_decoder() -> None:
    bomb = scan_bomb(5000, side=2048)  # 97 KB; decoding it took 33 s
    started = time.perf_counter()
    with pytest.raises(InvalidArgumentError, match=f"more than {jpeg.MAX_SCANS} scans") as refused:
        decode_image(bomb, FIELD, DEFAULT_LIMITS.max_input_image_pixels)
    assert refused.value.field == FIELD
    _refused_by_the_front_end(bomb, "more than 100 scans")
    assert time.perf_counter() - started < 1.0


def _padded(filler: bytes, count: int) -> bytes:
    """A 64x64 baseline JPEG with `filler` repeated after its scan's entropy-coded data."""
    data = _encoded(_noise(64, 64), "JPEG")
    return data[:-2] + filler * count + data[-2:]


def test_a_jpeg_of_many_markers_is_refused_after_a_bounded_walk() -> None:
    # 20 MiB of two-byte TEM markers: Pillow decodes it in a millisecond, the walk took 2.5 s of CPU a side.
    bomb = _padded(b"\xff\x01", 10_000_000)
    assert jpeg.walk(bomb) == (1, jpeg.MAX_MARKERS + 1, 0)  # one Python step a marker: it stops past the limit
    with pytest.raises(InvalidArgumentError, match=f"more than {jpeg.MAX_MARKERS} markers") as refused:
        decode_image(bomb, FIELD, DEFAULT_LIMITS.max_input_image_pixels)
    assert refused.value.field == FIELD
    with pytest.raises(ApiError, match=rf"input_images\[0\]\.data.*more than {jpeg.MAX_MARKERS} markers"):
        to_forward(pb.GenerateRequest(prompt="a cat", input_images=[pb.Image(data=bomb)]), DEFAULT_LIMITS)
    # Empty metadata segments are markers too (4 bytes each), and are refused before Pillow parses them one by one.
    segments_only = jpeg.SIGNATURE + b"\xff\xe1\x00\x02" * 5_000_000 + _encoded(_noise(), "JPEG")[2:]
    assert jpeg.walk(segments_only) == (0, jpeg.MAX_MARKERS + 1, 0)
    with pytest.raises(InvalidArgumentError, match=f"more than {jpeg.MAX_MARKERS} markers"), _no_pillow_parse():
        decode_image(segments_only, FIELD, DEFAULT_LIMITS.max_input_image_pixels)


def test_stray_bytes_before_the_first_scan_are_refused_before_pillow_reads_them() -> None:
    """Pillow's header parser reads bytes between segments one at a time in Python: 20 MB of fill bytes took 5 s."""
    data = _encoded(_noise(), "JPEG")
    fill = data[:2] + b"\xff" * 10_000_000 + data[2:]
    assert jpeg.walk(fill)[2] == jpeg.MAX_STRAY + 2  # the search for the next marker stops past the limit
    with pytest.raises(InvalidArgumentError, match="bytes between its header segments") as refused, _no_pillow_parse():
        decode_image(fill, FIELD, DEFAULT_LIMITS.max_input_image_pixels)
    assert refused.value.field == FIELD
    some = data[:2] + b"\xff" * jpeg.MAX_STRAY + data[2:]  # Pillow and libjpeg skip them
    assert decode_image(some, FIELD, DEFAULT_LIMITS.max_input_image_pixels).size == (64, 48)


def _no_pillow_parse() -> Any:
    """Fails the test if Pillow is asked to open the image."""
    return mock.patch.object(Image, "open", side_effect=AssertionError("Pillow opened it"))


def test_bytes_the_walk_skips_at_c_speed_are_no_steps() -> None:
    """Stuffed bytes, restart markers and fill bytes in any number leave the markers walked as they were; so do
    metadata segments of the largest size (skipped by their length, one step each)."""
    plain = jpeg.walk(_padded(b"", 0))
    assert jpeg.walk(_padded(b"\xff\x00", 5_000_000)) == plain
    assert jpeg.walk(_padded(b"\xff\xd0", 5_000_000)) == plain
    assert jpeg.walk(_padded(b"\xff", 10_000_000)) == plain  # after the first scan: libjpeg's, in C
    assert jpeg.walk(jpeg.SIGNATURE + b"\xff" * 10_000_000) == (0, 0, jpeg.MAX_STRAY + 2)  # searched no further
    huge_app = b"\xff\xe1\xff\xff" + bytes(65533)
    data = jpeg.SIGNATURE + huge_app * 300 + _padded(b"", 0)[2:]  # 19.7 MB
    assert jpeg.walk(data) == (plain[0], plain[1] + 300, 0)
    assert decode_image(data, FIELD, DEFAULT_LIMITS.max_input_image_pixels).size == (64, 64)


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


def test_a_tiff_whose_tile_outgrows_its_image_is_refused_from_its_header() -> None:
    assert len(TILE_BOMB) < 200
    with pytest.raises(InvalidArgumentError, match=r"TIFF tiles of 8192x8192 pixels, more than the 16x16 image") as r:
        decode_image(TILE_BOMB, FIELD, DEFAULT_LIMITS.max_input_image_pixels)
    assert r.value.field == FIELD
    _refused_by_the_front_end(TILE_BOMB, "TIFF tiles of 8192x8192")


def _refused_by_the_front_end(image: bytes, reason: str) -> None:
    """Refused as a generation's input image and as an Understand message's image, each naming its field."""
    with pytest.raises(ApiError, match=rf"input_images\[0\]\.data.*{reason}"):
        to_forward(pb.GenerateRequest(prompt="a cat", input_images=[pb.Image(data=image)]), DEFAULT_LIMITS)
    chat = pb.UnderstandRequest(
        messages=[pb.ChatMessage(role=pb.ROLE_USER, content=[pb.ContentPart(image=pb.Image(data=image))])]
    )
    with pytest.raises(ApiError, match=rf"messages\[0\]\.content\[0\]\.image.*{reason}"):
        to_chat_forward(chat, DEFAULT_CHAT_LIMITS)


@pytest.mark.parametrize(
    ("size", "layout"),
    [
        ((40, 30), {"tile": (32, 32)}),  # tiles over the edges
        ((16, 16), {"tile": (1024, 1024)}),  # any tile up to MAX_TILE_PIXELS
        ((1100, 1000), {"tile": (1104, 1008)}),  # one tile: the image's sides rounded up to multiples of 16
        ((16, 16), {"rows_per_strip": 2**32 - 1}),  # "all rows in one strip": libtiff cuts strips to the image
    ],
    ids=["tiles", "small-image-large-tile", "one-tile", "one-strip"],
)
def test_tiffs_whose_tiles_fit_decode(size: tuple[int, int], layout: dict[str, Any]) -> None:
    assert decode_image(tiff(*size, **layout), FIELD, DEFAULT_LIMITS.max_input_image_pixels).size == size


def test_a_tile_over_both_bounds_is_refused() -> None:
    assert MAX_TILE_PIXELS == 1024 * 1024
    with pytest.raises(InvalidArgumentError, match="TIFF tiles of 1024x1040 pixels"):
        decode_image(tiff(16, 16, tile=(1024, 1040)), FIELD, DEFAULT_LIMITS.max_input_image_pixels)
    with pytest.raises(InvalidArgumentError, match="TIFF tiles of 1120x1008 pixels"):
        decode_image(tiff(1100, 1000, tile=(1120, 1008)), FIELD, DEFAULT_LIMITS.max_input_image_pixels)


def _pillow_frames() -> list[str]:
    """Frames of Pillow's code still alive though no thread runs them: what a failed decode left behind, not what
    another thread of the process is decoding now (gc.get_objects only lists them, it collects nothing)."""
    running = {id(frame) for top in sys._current_frames().values() for frame, _ in traceback.walk_stack(top)}
    return [
        o.f_code.co_name
        for o in gc.get_objects()
        if isinstance(o, FrameType) and "/PIL/" in o.f_code.co_filename and id(o) not in running
    ]


def test_a_failed_decode_keeps_no_decoder_alive() -> None:
    """Decoded as the BLS decodes (on worker threads, gathered, the error caught): before, each failure's error
    chained Pillow's, whose traceback held the decoder's frame and its tile buffer (here 3 MiB; the attack's 169-byte
    file: 192 MiB and more) alive in reference cycles. With the cyclic collector off, nothing of it may remain."""
    broken = tiff(1024, 1024, tile=(1024, 1024), block=b"not deflate")  # a tile within the bound, its data corrupt

    async def request(pool: ThreadPoolExecutor) -> str:
        loop = asyncio.get_running_loop()
        decodes = (loop.run_in_executor(pool, decode_image, broken, FIELD, 10**7) for _ in range(3))
        try:
            await gather_or_cancel(*decodes)
        except InvalidArgumentError as exc:
            return str(exc)
        return "decoded"

    gc.collect()
    gc.disable()
    try:
        with ThreadPoolExecutor(2) as pool:
            for _ in range(3):
                assert "not a decodable image: its compressed pixel data is corrupt" in asyncio.run(request(pool))
        assert _pillow_frames() == []
    finally:
        gc.enable()


def _png_with_text(chunks: int, size: int) -> bytes:
    """A 16x16 PNG with `chunks` zTXt chunks of `size` zero bytes each, deflated (1 MB: 1 KB)."""
    text = b"".join(
        struct.pack(">I", len(body)) + b"zTXt" + body + struct.pack(">I", zlib.crc32(b"zTXt" + body))
        for body in (b"k%d\0\0" % i + zlib.compress(bytes(size), 9) for i in range(chunks))
    )
    png = _encoded(Image.new("RGB", (16, 16)), "PNG")
    return png[:33] + text + png[33:]  # after IHDR


def test_a_png_of_more_text_than_real_files_carry_is_refused_from_its_header() -> None:
    """60 KB inflating to 60 MB of text as the header was read (Pillow's own bound is 64 MB): +57 MiB an image."""
    bomb = _png_with_text(60, 1_000_000)
    assert len(bomb) < 64_000
    with pytest.raises(InvalidArgumentError, match="Too much memory used in text chunks") as refused:
        decode_image(bomb, FIELD, DEFAULT_LIMITS.max_input_image_pixels)
    assert refused.value.field == FIELD
    assert decode_image(_png_with_text(4, 1_000_000), FIELD, DEFAULT_LIMITS.max_input_image_pixels).size == (16, 16)


def test_pillows_internal_words_are_put_in_the_apis_own() -> None:
    """Before: "... could be decompression bomb DOS attack." and "decoder error -2" came back in the 400s."""
    ihdr = struct.pack(">IIBBBBB", 20_000, 20_000, 8, 2, 0, 0, 0)  # 400 M pixels stated: Pillow's guard
    bomb = _encoded(Image.new("RGB", (1, 1)), "PNG")
    bomb = bomb[:16] + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + bomb[33:]
    corrupt = tiff(64, 64, tile=(64, 64), block=b"not deflate")
    said = []
    for data in (bomb, corrupt):
        with pytest.raises(InvalidArgumentError) as refused:
            decode_image(data, FIELD, DEFAULT_LIMITS.max_input_image_pixels)
        said.append(refused.value.description)
    assert said[0].startswith("not a decodable image: its header states over 178956970 pixels"), said
    assert said[1] == "not a decodable image: its compressed pixel data is corrupt"
    assert not any("DOS" in text or "decoder error" in text for text in said)

"""Bad input on the real stack: unusual images are converted, broken ones refused naming the field, oversize
messages refused, and a property-based search over the request message finds no crash and no non-gRPC error."""

from __future__ import annotations

import io
import re
import struct
import threading
import time
import zlib
from collections.abc import Iterator

import grpc
import numpy as np
import openai
import pytest
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from omnigen2 import InvalidArgumentError, OmniGen2Client
from omnigen2.v1 import omnigen2_pb2 as pb
from omnigen2.v1 import omnigen2_pb2_grpc as pb_grpc
from PIL import Image

from serving.frontend.process import FrontendProcess
from serving.frontend.reading import INLINE_PARSE_BYTES
from serving.pipeline.request import DEFAULT_LIMITS
from serving.triton.launcher import TritonServer
from tests.jpeg_bombs import scan_bomb


def _encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (64, 48), colour) for colour in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    return _encode(frames[0], fmt, save_all=True, append_images=frames[1:])


CONVERTED = {
    "cmyk_jpeg": _encode(Image.new("CMYK", (64, 48), (0, 255, 255, 0)), "JPEG"),
    "rgba_png": _encode(Image.new("RGBA", (64, 48), (255, 0, 0, 100)), "PNG"),
    "grey_alpha_png": _encode(Image.new("LA", (64, 48), (90, 200)), "PNG"),
    "palette_transparent_png": _encode(Image.new("P", (64, 48), 3), "PNG", transparency=3),
    "grey_16bit_png": _encode(Image.fromarray(np.full((48, 64), 40000, dtype=np.uint16)), "PNG"),
    "animated_gif": _animated("GIF"),
    "animated_webp": _animated("WEBP"),
}


@pytest.fixture(scope="module")
def client(api: FrontendProcess) -> OmniGen2Client:
    return OmniGen2Client(api.address, timeout=120)


def test_exif_orientation_is_served_as_displayed(client: OmniGen2Client) -> None:
    """A phone photo stored sideways (orientation 6) is edited upright: the same image as the one stored upright."""
    stored = Image.fromarray(np.random.default_rng(6).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    sideways = client.edit(_encode(stored, "PNG", exif=exif.tobytes()), "Make it blue", steps=1, seed=1)
    upright = client.edit(_encode(stored.transpose(Image.Transpose.ROTATE_270), "PNG"), "Make it blue", steps=1, seed=1)
    assert sideways.images[0].size == upright.images[0].size == (48, 64)
    assert sideways.usage == upright.usage
    np.testing.assert_array_equal(np.asarray(sideways.images[0]), np.asarray(upright.images[0]))


def test_float_images_are_refused_naming_the_field(client: OmniGen2Client) -> None:
    data = _encode(Image.fromarray(np.full((48, 64), 0.5, dtype=np.float32)), "TIFF")
    with pytest.raises(InvalidArgumentError) as refused:
        client.edit(data, "Make it blue", steps=1)
    assert refused.value.violations[0].field == "input_images[0].data"


@pytest.mark.parametrize("name", sorted(CONVERTED))
def test_unusual_images_are_converted(client: OmniGen2Client, name: str) -> None:
    result = client.edit(CONVERTED[name], "Make it blue", steps=1, seed=1)
    assert result.images[0].size == (64, 48)  # one input image, no size: the input's size
    answer = client.understand("What is this?", [CONVERTED[name]], max_new_tokens=1)
    assert answer.completion_tokens == 1


def _jpeg() -> bytes:
    rng = np.random.default_rng(0)
    return _encode(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG", quality=90)


def _rows_missing_png() -> bytes:
    """A well-formed PNG whose header says 64 rows and whose (complete) compressed stream holds 32: Pillow loads it
    without complaint, the missing half black."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rows = b"".join(b"\x00" + bytes([128]) * 64 * 3 for _ in range(32))
    header = struct.pack(">IIBBBBB", 64, 64, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


BROKEN = {
    "truncated_jpeg": _jpeg()[: len(_jpeg()) // 2],
    "truncated_png": CONVERTED["rgba_png"][:60],
    "zero_bytes": b"",
    "text_file": b"just some text, not an image",
    "bomb": _encode(Image.new("1", (8000, 6000)), "PNG"),  # 48 M pixels from a few KB
    "too_small": _encode(Image.new("RGB", (8, 8)), "PNG"),  # nothing left after fitting to multiples of 16
    "rows_missing_png": _rows_missing_png(),
    "jpeg_scan_bomb": scan_bomb(3000, side=2048),  # 65 KB that decode for about 20 s
    "eps": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\nshowpage\n",  # not a format of docs/api.md
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_images_are_refused_naming_the_field(client: OmniGen2Client, name: str) -> None:
    fine = CONVERTED["rgba_png"]
    with pytest.raises(InvalidArgumentError) as raised:
        client.compose([fine, BROKEN[name]], "Together", width=32, height=32, steps=1)
    assert [v.field for v in raised.value.violations] == ["input_images[1].data"]
    assert client.generate("Still serving", width=32, height=32, steps=1).images


def test_a_jpeg_scan_bomb_is_refused_by_its_header_in_understand_too(client: OmniGen2Client) -> None:
    started = time.monotonic()
    with pytest.raises(InvalidArgumentError, match="more than 100 scans") as raised:
        client.understand("What is this?", [BROKEN["jpeg_scan_bomb"]], max_new_tokens=1)
    assert raised.value.violations[0].field.endswith(".image.data")
    assert time.monotonic() - started < 2  # refused in the front end, not after seconds of decoding


def test_oversize_image_is_refused_before_decoding(client: OmniGen2Client) -> None:
    huge = b"\x89PNG\r\n\x1a\n" + bytes(DEFAULT_LIMITS.max_input_image_bytes)
    with pytest.raises(InvalidArgumentError) as raised:
        client.edit(huge, "Anything", steps=1)
    assert raised.value.violations[0].field == "input_images[0].data"
    assert "bytes" in raised.value.violations[0].description


def test_every_input_image_too_small_for_the_model_is_named_over_grpc_and_http(
    client: OmniGen2Client, api: FrontendProcess
) -> None:
    """At side length 16 both images become 16x5: both are named, the same each time, before admission (the model
    stopped at whichever it resized first); the HTTP answer names them as its multipart parts."""
    small = [_encode(Image.new("RGB", size), "PNG") for size in ((112, 35), (117, 40))]
    for _ in range(3):
        with pytest.raises(InvalidArgumentError) as refused:
            client.compose(small, "Together", width=64, height=64, steps=1, max_input_image_side_length=16)
        assert [v.field for v in refused.value.violations] == ["input_images[0].data", "input_images[1].data"]
    http = openai.OpenAI(base_url=api.http_url, api_key="unused", max_retries=0, timeout=120)
    with pytest.raises(openai.BadRequestError) as answered:
        parts = [(f"{i}.png", data, "image/png") for i, data in enumerate(small)]
        http.images.edit(image=parts, prompt="Together", extra_body={"max_input_image_side_length": 16, "steps": 1})
    error = answered.value.body
    assert isinstance(error, dict) and error["param"] == "image[0]"
    assert re.fullmatch(r"image\[0\]: image of 112x35 .*; image\[1\]: image of 117x40 .*", error["message"])


def test_understand_max_pixels_starts_at_the_vision_minimum(client: OmniGen2Client) -> None:
    """784..3135 was documented but the model refuses it with an image: the served bound is the model's, reported."""
    assert client.info().understand_limits.min_pixels == 3136
    image = _encode(Image.new("RGB", (64, 64)), "PNG")
    for images in ([], [image]):
        with pytest.raises(InvalidArgumentError, match=r"must be in \[3136, 1003520\], got 3135") as refused:
            client.understand("What is this?", images, max_new_tokens=1, max_pixels=3135)
        assert [v.field for v in refused.value.violations] == ["max_pixels"]
        assert client.understand("What is this?", images, max_new_tokens=1, max_pixels=3136).completion_tokens == 1


@pytest.fixture(scope="module")
def small_requests(tmp_path_factory: pytest.TempPathFactory, triton: TritonServer) -> Iterator[FrontendProcess]:
    log = tmp_path_factory.mktemp("small-requests") / "frontend.log"
    with FrontendProcess(triton.grpc_url, log, f"--max-request-bytes={2**20}") as api:
        api.wait_health(health_pb2.HealthCheckResponse.SERVING)  # after its warm-up: the tests check it stays so
        yield api


def test_oversize_message_names_its_largest_field(small_requests: FrontendProcess) -> None:
    client = OmniGen2Client(small_requests.address, timeout=60, retries=0)
    with pytest.raises(InvalidArgumentError) as raised:  # 1.2 MB against a 1 MiB limit
        client.compose([bytes(800_000), bytes(400_000)], "Too big", steps=1)
    assert [v.field for v in raised.value.violations] == ["input_images[0].data"]
    with pytest.raises(InvalidArgumentError) as long_question:
        client.understand("x" * 1_100_000, max_new_tokens=1)
    assert long_question.value.violations[0].field == "messages[0].content[0].text"
    stub = pb_grpc.OmniGen2Stub(grpc.insecure_channel(small_requests.address))
    with pytest.raises(grpc.RpcError) as transport:  # over twice the limit: refused unread by the transport
        stub.Generate(pb.GenerateRequest(prompt="x" * 3 * 2**20), timeout=30)
    assert transport.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert small_requests.health() == health_pb2.HealthCheckResponse.SERVING


def test_a_message_of_many_tiny_fields_is_refused_while_health_answers(small_requests: FrontendProcess) -> None:
    """600 000 empty input images (1.2 MB): sizing them walked every field on the event loop (a million took 6 s,
    health waiting with it); now their count is refused before anything walks them."""
    stub = pb_grpc.OmniGen2Stub(grpc.insecure_channel(small_requests.address))
    request = pb.GenerateRequest(prompt="x", input_images=[pb.Image()] * 600_000)
    outcome: list[grpc.RpcError] = []

    def call() -> None:
        try:
            stub.Generate(request, timeout=60)
        except grpc.RpcError as exc:
            outcome.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    slowest = 0.0
    while caller.is_alive():
        started = time.monotonic()
        assert small_requests.health() == health_pb2.HealthCheckResponse.SERVING
        slowest = max(slowest, time.monotonic() - started)
    caller.join()
    assert outcome and outcome[0].code() == grpc.StatusCode.INVALID_ARGUMENT
    assert outcome[0].details() == "input_images: at most 5 images, got 600000"
    assert slowest < 0.5, f"health waited {slowest:.2f} s"


def _mostly(valid: st.SearchStrategy[object], invalid: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    """Valid 9 times in 10, so that about one request in five passes validation and really runs."""
    return st.integers(0, 9).flatmap(lambda roll: invalid if roll == 0 else valid)


_int32 = st.integers(-(2**31), 2**31 - 1)
_floats = st.floats(allow_nan=True, allow_infinity=True)
# Valid values are kept small (tiny sizes, 1-2 steps) so that requests that pass validation finish fast.
_requests = st.builds(
    dict,
    prompt=_mostly(st.text(min_size=1, max_size=40).filter(str.strip), st.sampled_from(["", "  ", "x" * 9000])),
    negative_prompt=_mostly(st.text(max_size=10), st.just("x" * 9000)),
    width=_mostly(st.sampled_from([16, 32, 33]), _int32),
    height=_mostly(st.sampled_from([16, 32, 33]), _int32),
    steps=_mostly(st.integers(1, 2), st.integers(-(2**31), 0) | st.integers(201, 2**31 - 1)),
    text_guidance_scale=_mostly(st.none() | st.floats(0, 8), _floats),
    image_guidance_scale=_mostly(st.none() | st.floats(0, 8), _floats),
    cfg=_mostly(st.none() | st.tuples(st.floats(0, 0.5), st.floats(0.5, 1)), st.tuples(_floats, _floats)),
    scheduler=_mostly(st.integers(0, 2), st.integers(-3, 9)),
    seed=_mostly(st.none() | st.integers(0, 2**63 - 1), st.integers(-(2**63), -1)),
    num_images_per_prompt=_mostly(st.none() | st.integers(1, 2), st.integers(-5, 10)),
    max_pixels=_mostly(st.none() | st.integers(4096, 16384), _int32),
    max_input_image_side_length=_mostly(st.none() | st.integers(64, 4096), _int32),
    output_format=_mostly(st.integers(0, 3), st.integers(-2, 9)),
    quality=_mostly(st.none() | st.integers(1, 100), _int32),
    images=_mostly(
        st.lists(st.sampled_from(list(CONVERTED.values())), max_size=2),
        st.lists(st.binary(max_size=64) | st.sampled_from(list(BROKEN.values())), min_size=1, max_size=7),
    ),
)


def _message(fields: dict[str, object]) -> pb.GenerateRequest:
    request = pb.GenerateRequest(
        prompt=fields.pop("prompt"), input_images=[pb.Image(data=b) for b in fields.pop("images")]
    )
    cfg = fields.pop("cfg")
    if cfg is not None:
        request.cfg_range.start, request.cfg_range.end = cfg  # type: ignore[misc]
    for name, value in fields.items():
        if value is not None:
            setattr(request, name, value)
    return request


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fields=_requests)
def test_property_no_crash_and_only_documented_statuses(api: FrontendProcess, fields: dict[str, object]) -> None:
    request = _message(dict(fields))
    stub = pb_grpc.OmniGen2Stub(grpc.insecure_channel(api.address))
    try:
        response = stub.Generate(request, timeout=60)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (exc.code(), exc.details())
        assert exc.details()  # names what is wrong
        event(f"INVALID_ARGUMENT {exc.details().partition(':')[0]}")
    else:
        assert response.images and response.seed >= 0
        event("OK")


def test_server_still_healthy_after_the_search(api: FrontendProcess) -> None:
    assert api.health() == health_pb2.HealthCheckResponse.SERVING


def test_large_garbage_parsed_off_the_event_loop_is_invalid_argument(api: FrontendProcess) -> None:
    """Requests of INLINE_PARSE_BYTES or more are parsed on the front end's reader thread: bytes there that are not
    a message still end INVALID_ARGUMENT naming the request, as the small ones parsed on the loop do."""
    with grpc.insecure_channel(api.address) as channel, pytest.raises(grpc.RpcError) as raised:
        channel.unary_unary("/omnigen2.v1.OmniGen2/Generate")(b"\xff" * (2 * INLINE_PARSE_BYTES), timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details().startswith("request: not a valid Generate request")


@pytest.mark.parametrize("method", ["Generate", "GenerateStream", "Understand", "GetModelInfo"])
def test_garbage_request_bytes_are_invalid_argument(api: FrontendProcess, method: str) -> None:
    """grpcio's own answer to bytes that do not parse is UNKNOWN, with a traceback in the log and no count."""
    channel = grpc.insecure_channel(api.address)
    path = f"/omnigen2.v1.OmniGen2/{method}"
    streaming = method in ("GenerateStream", "Understand")
    call = (channel.unary_stream if streaming else channel.unary_unary)(path)
    logged_before = api.log_path.stat().st_size  # the front end is shared: read only this call's lines
    with pytest.raises(grpc.RpcError) as raised:
        response = call(b"\x0a\xff\xff\xff\xff", timeout=10)
        if streaming:
            list(response)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details().startswith("request: not a valid")
    deadline = time.monotonic() + 5  # the count lands as the call's handler finishes, maybe just after the reply
    while api.metric("omnigen2_requests_total", code="INVALID_ARGUMENT", method=method) is None:
        assert time.monotonic() < deadline, f"no INVALID_ARGUMENT counted for {method}"
        time.sleep(0.05)
    with api.log_path.open() as log:
        log.seek(logged_before)
        assert "Traceback" not in log.read()

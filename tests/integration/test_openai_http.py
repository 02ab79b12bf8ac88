"""The OpenAI-compatible HTTP API on the real stack, called with the official `openai` package, curl and raw HTTP:
the same pixels and answers as the gRPC API, OpenAI-shaped errors with the matching statuses, and no 5xx for any
body a search throws at it."""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omnigen2 import ChatTurn, OmniGen2Client, Progress
from PIL import Image

from serving.frontend.metrics_page import sample
from serving.frontend.openai_http import FORM_FIELDS, body_limit
from serving.frontend.process import FrontendProcess
from serving.triton.launcher import TritonServer
from serving.triton.ports import free_port
from tests.golden import templated_tokens

API_DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"
SMALL = {"num_inference_steps": 2, "seed": 7}


@pytest.fixture(scope="module")
def client(api: FrontendProcess) -> OmniGen2Client:
    return OmniGen2Client(api.address, timeout=120)


@pytest.fixture(scope="module")
def http_client(api: FrontendProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=api.http_url, api_key="unused", max_retries=0, timeout=120)


def _png(size: tuple[int, int], seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _request(
    api: FrontendProcess, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], Any]:
    connection = http.client.HTTPConnection("127.0.0.1", api.http_port, timeout=120)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        raw = response.read()
        answer = json.loads(raw) if response.getheader("Content-Type", "").startswith("application/json") else raw
        return response.status, dict(response.getheaders()), answer
    finally:
        connection.close()


def _post_json(api: FrontendProcess, path: str, body: object, **headers: str) -> tuple[int, dict[str, str], Any]:
    return _request(api, "POST", path, json.dumps(body).encode(), {"Content-Type": "application/json", **headers})


def _assert_error(answer: Any, param: str | None) -> None:
    assert set(answer) == {"error"}, answer
    assert set(answer["error"]) == {"message", "type", "param", "code"}, answer
    assert answer["error"]["param"] == param, answer


# What the openai package sees


def test_models_lists_omnigen2(http_client: openai.OpenAI) -> None:
    assert [model.id for model in http_client.models.list()] == ["OmniGen2"]


def test_images_generate_equals_the_grpc_generate(
    http_client: openai.OpenAI, client: OmniGen2Client, tiny_checkpoint: Path
) -> None:
    answer = http_client.images.generate(
        model="OmniGen2",
        prompt="A red apple on a wooden table",
        n=2,
        size="64x48",
        response_format="b64_json",
        extra_body={**SMALL, "guidance_scale": 4.0, "scheduler": "dpmsolver", "cfg_range": [0.0, 0.5]},
    )
    expected = client.generate(
        "A red apple on a wooden table",
        width=64,
        height=48,
        num_images_per_prompt=2,
        steps=2,
        seed=7,
        text_guidance_scale=4.0,
        scheduler="dpmsolver",
        cfg_range=(0.0, 0.5),
    )
    assert answer.data is not None and len(answer.data) == 2
    for image, encoded in zip(answer.data, expected.encoded, strict=True):
        assert image.b64_json is not None
        got = _pixels(base64.b64decode(image.b64_json))
        assert got.shape == (48, 64, 3)
        np.testing.assert_array_equal(got, _pixels(encoded))
    assert answer.model_extra is not None and answer.model_extra["seed"] == 7
    # Text guidance reads the templated prompt and the (empty) negative prompt; 2 images of 4 x 3 16-px patches.
    text = templated_tokens(tiny_checkpoint, "A red apple on a wooden table") + templated_tokens(tiny_checkpoint, "")
    assert answer.usage is not None and answer.usage.model_dump(exclude_none=True) == {
        "total_tokens": text + 24,
        "input_tokens": text,
        "output_tokens": 2 * (64 // 16) * (48 // 16),
        "input_tokens_details": {"text_tokens": text, "image_tokens": 0},
    }
    assert (expected.usage.text_tokens, expected.usage.output_tokens) == (text, 24)


@pytest.mark.parametrize("output_format", ["jpeg", "webp"])
def test_output_format(http_client: openai.OpenAI, output_format: str) -> None:
    answer = http_client.images.generate(
        prompt="A lighthouse",
        size="32x32",
        output_format=output_format,
        extra_body=SMALL,
    )
    assert answer.data is not None and answer.data[0].b64_json is not None
    assert Image.open(io.BytesIO(base64.b64decode(answer.data[0].b64_json))).format == output_format.upper()
    assert answer.output_format == output_format


def test_images_edit_one_image_equals_the_grpc_edit(http_client: openai.OpenAI, client: OmniGen2Client) -> None:
    source = _png((64, 48), 1)
    answer = http_client.images.edit(image=("source.png", source, "image/png"), prompt="Make it blue", extra_body=SMALL)
    expected = client.edit(source, "Make it blue", steps=2, seed=7)
    assert answer.data is not None and answer.data[0].b64_json is not None
    got = _pixels(base64.b64decode(answer.data[0].b64_json))
    assert got.shape == (48, 64, 3)  # one input image, no size: the input's size
    np.testing.assert_array_equal(got, _pixels(expected.encoded[0]))


def test_images_edit_three_images_composes(http_client: openai.OpenAI, client: OmniGen2Client) -> None:
    sources = [_png((32, 32), seed) for seed in (2, 3, 4)]
    answer = http_client.images.edit(
        image=[(f"in{i}.png", data, "image/png") for i, data in enumerate(sources)],  # sent as image[]
        prompt="The three of them together",
        size="48x32",
        extra_body={**SMALL, "image_guidance_scale": 1.5},
    )
    expected = client.compose(
        sources, "The three of them together", width=48, height=32, image_guidance_scale=1.5, steps=2, seed=7
    )
    assert answer.data is not None and answer.data[0].b64_json is not None
    np.testing.assert_array_equal(_pixels(base64.b64decode(answer.data[0].b64_json)), _pixels(expected.encoded[0]))


def _question(image: bytes) -> list[dict[str, Any]]:
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is in the picture?"}]
    return [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": parts}]


def test_chat_completion_equals_understand(http_client: openai.OpenAI, client: OmniGen2Client) -> None:
    image = _png((56, 56), 5)
    answer = http_client.chat.completions.create(
        model="OmniGen2",
        messages=_question(image),  # type: ignore[arg-type]
        max_tokens=6,
        seed=3,
    )
    expected = client.understand(
        [ChatTurn("system", ["Answer briefly."]), ChatTurn("user", [image, "What is in the picture?"])],
        max_new_tokens=6,
        seed=3,
    )
    assert answer.choices[0].message.content == expected.text
    assert answer.choices[0].finish_reason == ("length" if expected.finish_reason == "length" else "stop")
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (
        expected.prompt_tokens,
        expected.completion_tokens,
    )


def test_chat_completion_streams_server_sent_events(http_client: openai.OpenAI) -> None:
    image = _png((56, 56), 5)
    whole = http_client.chat.completions.create(
        model="OmniGen2",
        messages=_question(image),
        max_tokens=6,
        seed=3,
    )
    stream = http_client.chat.completions.create(
        model="OmniGen2",
        messages=_question(image),
        max_tokens=6,
        seed=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert len({c.id for c in chunks}) == 1


def test_stream_ends_with_done_and_keeps_the_request_id(api: FrontendProcess) -> None:
    body = {"model": "OmniGen2", "messages": _question(_png((56, 56), 5)), "max_tokens": 2, "stream": True}
    status, headers, raw = _post_json(api, "/v1/chat/completions", body, **{"x-request-id": "http-test-1"})
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    assert headers["x-request-id"] == "http-test-1"
    events = [line for line in raw.decode().split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0].removeprefix("data: "))["id"] == "chatcmpl-http-test-1"


# Streamed images: partial images (the gRPC previews), then the completed images


def test_images_generate_streams_partial_images_then_the_same_image(http_client: openai.OpenAI) -> None:
    settings = {"size": "32x32", "extra_body": {"num_inference_steps": 3, "seed": 7}}
    events = list(http_client.images.generate(prompt="A lighthouse", stream=True, partial_images=2, **settings))
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    partials, completed = events[:2], events[2]
    assert [getattr(e, "partial_image_index", None) for e in partials] == [0, 1]
    for event in events:
        assert (event.size, event.output_format) == ("32x32", "png") and event.created_at > 0
        assert _pixels(base64.b64decode(event.b64_json)).shape == (32, 32, 3)
    assert completed.model_extra is not None and completed.model_extra["seed"] == 7
    assert all(getattr(e, "usage", None) is None for e in partials)
    plain = http_client.images.generate(prompt="A lighthouse", **settings)
    assert plain.usage is not None and plain.usage.output_tokens == 2 * 2  # one 32x32 image: 2 x 2 patches of 16 px
    assert completed.usage.model_dump() == plain.usage.model_dump(exclude_none=True)
    assert plain.data is not None and plain.data[0].b64_json is not None
    expected = _pixels(base64.b64decode(plain.data[0].b64_json))
    np.testing.assert_array_equal(_pixels(base64.b64decode(completed.b64_json)), expected)
    assert not np.array_equal(_pixels(base64.b64decode(partials[0].b64_json)), expected)  # an earlier estimate


def test_images_edit_streams_and_n_images_complete_one_by_one(
    http_client: openai.OpenAI, tiny_checkpoint: Path
) -> None:
    source = ("source.png", _png((32, 32), 1), "image/png")
    events = list(
        http_client.images.edit(image=source, prompt="Make it blue", stream=True, partial_images=1, extra_body=SMALL)
    )
    assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"]
    plain = http_client.images.edit(image=source, prompt="Make it blue", extra_body=SMALL)
    assert plain.data is not None and plain.data[0].b64_json is not None
    np.testing.assert_array_equal(
        _pixels(base64.b64decode(events[1].b64_json)), _pixels(base64.b64decode(plain.data[0].b64_json))
    )
    text = templated_tokens(tiny_checkpoint, "Make it blue") + templated_tokens(tiny_checkpoint, "")
    usage = events[1].usage  # the 32x32 input and output are 2 x 2 patches of 16 px each
    assert usage is not None and usage.input_tokens_details.model_dump() == {"text_tokens": text, "image_tokens": 4}
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (text + 4, 4, text + 8)
    assert plain.usage is not None and usage.model_dump() == plain.usage.model_dump(exclude_none=True)
    # n > 1 streams without partial images (the previews show the first image only): one completed event each,
    # whose usage is that image's output, the first one's beside the request's whole input.
    both = list(http_client.images.generate(prompt="Two cats", n=2, size="16x16", stream=True, extra_body=SMALL))
    assert [e.type for e in both] == ["image_generation.completed"] * 2
    text = templated_tokens(tiny_checkpoint, "Two cats") + templated_tokens(tiny_checkpoint, "")
    assert [(e.usage.input_tokens, e.usage.output_tokens) for e in both if e.usage] == [(text, 1), (0, 1)]


def test_streamed_images_refused_before_the_stream_are_http_errors(api: FrontendProcess) -> None:
    http_client = openai.OpenAI(base_url=api.http_url, api_key="unused", max_retries=0, timeout=60)
    for extra, param in [
        ({"partial_images": 4}, "partial_images"),
        ({"partial_images": 1, "n": 2}, "n"),
        ({"extra_body": {"steps": 0}}, "steps"),  # refused by the service: still before the first event
    ]:
        with pytest.raises(openai.BadRequestError) as refused:
            list(http_client.images.generate(prompt="x", size="16x16", stream=True, **extra))
        assert refused.value.param == param
    status, _, answer = _post_json(api, "/v1/images/generations", {"prompt": "x", "partial_images": 1})
    assert status == 400 and answer["error"]["param"] == "partial_images"  # only with stream: true


def test_a_streamed_image_that_fails_midway_ends_with_an_error_event(tmp_path: Path, triton: TritonServer) -> None:
    """--max-run-s ends the run after its first events: the status line has gone, so an SSE error event carries
    the error, which the openai package raises."""
    with FrontendProcess(triton.grpc_url, tmp_path / "frontend.log", "--max-run-s=1", http=True) as frontend:
        body = {"prompt": "Slow", "size": "256x256", "steps": 200, "stream": True}
        status, headers, raw = _post_json(frontend, "/v1/images/generations", body)
        assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
        name, data = raw.decode().strip().split("\n")
        assert name == "event: error"
        answer = json.loads(data.removeprefix("data: "))
        assert answer["type"] == "error" and answer["error"]["code"] == "timeout"
        http_client = openai.OpenAI(base_url=frontend.http_url, api_key="unused", max_retries=0, timeout=60)
        with pytest.raises(openai.APIError) as raised:
            list(http_client.images.generate(prompt="Slow", size="256x256", stream=True, extra_body={"steps": 200}))
        assert isinstance(raised.value.body, dict) and raised.value.body["code"] == "timeout"


def _cancelled_streams(api: FrontendProcess) -> float:
    return api.metric("omnigen2_requests_total", code="CANCELLED", method="GenerateStream") or 0.0


def test_a_caller_that_disconnects_from_a_stream_cancels_its_call(api: FrontendProcess) -> None:
    before = _cancelled_streams(api)
    body = {"prompt": "Slow", "size": "256x256", "steps": 200, "stream": True}
    connection = http.client.HTTPConnection("127.0.0.1", api.http_port, timeout=60)
    connection.request("POST", "/v1/images/generations", json.dumps(body), {"Content-Type": "application/json"})
    assert connection.getresponse().status == 200  # sent after the first step
    connection.close()
    deadline = time.monotonic() + 30
    while _cancelled_streams(api) == before:
        assert time.monotonic() < deadline
        time.sleep(0.2)


# Bad input: OpenAI-shaped 4xx naming the field, and the server keeps serving


def test_openai_errors_name_the_field(http_client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as too_many:
        http_client.images.generate(prompt="x", n=99, size="32x32", extra_body=SMALL)
    assert too_many.value.param == "n" and "n: must be in [1, " in too_many.value.message
    with pytest.raises(openai.BadRequestError) as too_big:
        http_client.images.generate(prompt="x", size="99999x32", extra_body=SMALL)
    assert too_big.value.param == "size"
    with pytest.raises(openai.BadRequestError) as steps:
        http_client.images.generate(prompt="x", size="32x32", extra_body={"num_inference_steps": 0})
    assert steps.value.param == "num_inference_steps"
    with pytest.raises(openai.BadRequestError) as url:
        http_client.images.generate(prompt="x", response_format="url")
    assert url.value.param == "response_format"
    with pytest.raises(openai.BadRequestError) as unknown:
        http_client.images.generate(prompt="x", style="vivid")
    assert unknown.value.param == "style" and unknown.value.code == "unknown_parameter"
    with pytest.raises(openai.NotFoundError) as model:
        http_client.images.generate(prompt="x", model="dall-e-3")
    assert model.value.code == "model_not_found"
    broken = [("a.png", b"not an image", "image/png")] + [
        (f"{i}.png", _png((16, 16), i), "image/png") for i in range(5)
    ]
    with pytest.raises(openai.BadRequestError) as images:
        http_client.images.edit(image=broken, prompt="x", extra_body=SMALL)
    assert images.value.param == "image"  # six images: over the limit, named as a whole
    with pytest.raises(openai.BadRequestError) as header:
        http_client.images.edit(image=broken[:1], prompt="x", extra_body=SMALL)
    assert header.value.param == "image[0]"
    remote = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]
    with pytest.raises(openai.BadRequestError) as fetch:
        http_client.chat.completions.create(model="OmniGen2", messages=remote)  # type: ignore[arg-type]
    assert fetch.value.param == "messages[0].content[0].image_url" and "fetches no remote image" in fetch.value.message
    with pytest.raises(openai.BadRequestError) as tokens:
        http_client.chat.completions.create(model="OmniGen2", messages=_question(_png((28, 28), 1)), max_tokens=0)  # type: ignore[arg-type]
    assert tokens.value.param == "max_tokens"


@pytest.mark.parametrize(
    ("path", "body", "content_type", "status", "param"),
    [
        ("/v1/images/generations", b'{"prompt": "x",', "application/json", 400, None),
        ("/v1/images/generations", b'{"prompt": "x", "seed": NaN}', "application/json", 400, None),
        ("/v1/images/generations", b'["prompt"]', "application/json", 400, None),
        ("/v1/images/generations", b"\xff\xfe", "application/json", 400, None),
        ("/v1/images/generations", b"prompt=x", "application/x-www-form-urlencoded", 415, None),
        ("/v1/images/generations", b'{"prompt": "x", "n": "2"}', "application/json", 400, "n"),
        ("/v1/images/generations", b'{"prompt": "x", "seed": 1e400}', "application/json", 400, "seed"),
        ("/v1/images/generations", b'{"prompt": "x", "cfg_range": [0, "a"]}', "application/json", 400, "cfg_range"),
        ("/v1/images/edits", b'{"prompt": "x"}', "application/json", 415, None),
        ("/v1/images/edits", b"--x\r\nbroken", "multipart/form-data; boundary=x", 400, None),
        ("/v1/chat/completions", b'{"messages": [{"role": "user"}], "tools": []}', "application/json", 400, "tools"),
        ("/v1/chat/completions", b'{"messages": []}', "application/json", 400, "messages"),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": 5}]}',
            "application/json",
            400,
            "messages[0].content",
        ),
    ],
)
def test_bad_bodies_are_4xx_naming_the_field(
    api: FrontendProcess, path: str, body: bytes, content_type: str, status: int, param: str | None
) -> None:
    got, _, answer = _request(api, "POST", path, body, {"Content-Type": content_type})
    assert got == status, answer
    _assert_error(answer, param)


def _edit_with_one_field(api: FrontendProcess, name: str, copies: int = 1) -> tuple[int, Any]:
    """An edits request whose multipart form holds the text field `name` (value "x") `copies` times, and no image."""
    boundary = "b0undary"
    part = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\nx\r\n'
    body = (part * copies + f"--{boundary}--\r\n").encode()
    status, _, answer = _request(
        api, "POST", "/v1/images/edits", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    return status, answer


def test_edits_without_an_image_name_it(api: FrontendProcess) -> None:
    status, answer = _edit_with_one_field(api, "prompt")
    assert status == 400
    _assert_error(answer, "image")


def test_a_text_field_sent_as_a_list_says_so(api: FrontendProcess) -> None:
    status, answer = _edit_with_one_field(api, "prompt[]")
    assert status == 400
    _assert_error(answer, "prompt")
    assert "takes one value: send it as `prompt`, not `prompt[]`" in answer["error"]["message"]


def test_a_form_with_too_many_fields_says_so_not_too_large(api: FrontendProcess) -> None:
    """A 400 that says so, not a 413 about a body far under the limit."""
    status, answer = _edit_with_one_field(api, "cfg_range", copies=FORM_FIELDS + 1)
    assert status == 400
    _assert_error(answer, None)
    assert answer["error"]["message"] == f"the form has more than the {FORM_FIELDS} fields a form may have"


def test_oversize_body_is_refused_before_it_is_read(api: FrontendProcess) -> None:
    """The Content-Length alone is over the limit: 413 comes back though no byte of the body was sent."""
    connection = http.client.HTTPConnection("127.0.0.1", api.http_port, timeout=30)
    try:
        connection.putrequest("POST", "/v1/images/generations")
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str(10**12))
        connection.endheaders()
        response = connection.getresponse()
        assert response.status == 413
        answer = json.loads(response.read())
        _assert_error(answer, None)
        assert answer["error"]["message"].startswith(f"the body is {10**12} bytes, over the limit of ")
    finally:
        connection.close()


def test_oversize_body_without_a_length_is_cut_off_at_the_limit(api: FrontendProcess) -> None:
    """A chunked body states no size: it is refused as it passes the limit, and the message says only that."""
    limit = body_limit(64 * 1024 * 1024)  # the front end's default --max-request-bytes
    chunk = b"0" * (1024 * 1024)
    connection = http.client.HTTPConnection("127.0.0.1", api.http_port, timeout=60)
    try:
        connection.putrequest("POST", "/v1/images/generations")
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Transfer-Encoding", "chunked")
        connection.endheaders()
        try:
            for _ in range(limit // len(chunk) + 2):
                connection.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed while the body was still coming
        response = connection.getresponse()
        assert response.status == 413
        answer = json.loads(response.read())
        _assert_error(answer, None)
        assert answer["error"]["message"] == f"the body is over the limit of {limit} bytes"
    finally:
        connection.close()


def test_unknown_routes_and_methods_are_openai_shaped(api: FrontendProcess) -> None:
    status, _, answer = _request(api, "GET", "/v1/images/generations")
    assert status == 405
    _assert_error(answer, None)
    status, _, answer = _request(api, "GET", "/v1/nothing")
    assert status == 404
    _assert_error(answer, None)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
# Valid values are small (tiny sizes, 1-2 steps, a few tokens), so bodies that pass validation finish fast.
_image_bodies = st.fixed_dictionaries(
    {"prompt": st.sampled_from(["a cat", "", "\ud800"]) | _json_values},
    optional={
        "n": st.integers(-1, 3) | _json_values,
        "size": st.sampled_from(["16x16", "32x16", "0x16", "16x999999", "auto", "16", "axb"]) | _json_values,
        "num_inference_steps": st.integers(-1, 2) | _json_values,
        "steps": st.integers(1, 2),
        "guidance_scale": st.floats(-1, 9) | _json_values,
        "cfg_range": st.lists(st.floats(-1, 2), max_size=3) | _json_values,
        "scheduler": st.sampled_from(["euler", "dpmsolver", "ddim"]) | _json_values,
        "output_format": st.sampled_from(["png", "jpeg", "webp", "gif"]) | _json_values,
        "response_format": st.sampled_from(["b64_json", "url"]) | _json_values,
        "stream": st.booleans() | _json_values,
        "partial_images": st.integers(-1, 4) | _json_values,
        "seed": st.integers(-(2**64), 2**64) | _json_values,
        "max_sequence_length": st.integers(-1, 300),
        "model": st.sampled_from(["OmniGen2", "x"]) | _json_values,
        "surprise": _json_values,
    },
).map(lambda body: body if "size" in body else {**body, "size": "16x16"})  # the default, 1024x1024, is slow
_chat_bodies = st.fixed_dictionaries(
    {
        "messages": st.lists(
            st.fixed_dictionaries(
                {"role": st.sampled_from(["user", "system", "tool"]) | _json_values},
                optional={"content": st.text(max_size=20) | _json_values},
            ),
            max_size=2,
        )
        | _json_values,
        "max_tokens": st.integers(-1, 2),
    },
    optional={
        "stream": st.booleans() | _json_values,
        "stop": st.text(max_size=3) | _json_values,
        "temperature": st.floats(-1, 3) | _json_values,
        "n": st.integers(0, 2),
        "model": st.sampled_from(["OmniGen2", "x"]),
        "logit_bias": _json_values,
    },
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    route_body=st.tuples(st.just("/v1/images/generations"), _image_bodies)
    | st.tuples(st.just("/v1/chat/completions"), _chat_bodies)
)
def test_property_json_bodies_get_2xx_or_openai_shaped_4xx(api: FrontendProcess, route_body: tuple[str, Any]) -> None:
    path, body = route_body
    status, _, answer = _post_json(api, path, body)
    assert status < 500, answer
    if status >= 400:
        assert status in (400, 404, 413, 415, 429), answer
        _assert_error(answer, answer["error"]["param"])


def test_still_serving_and_counted_after_the_search(api: FrontendProcess) -> None:
    status, _, answer = _request(api, "GET", "/v1/models")
    assert status == 200 and answer["data"][0]["id"] == "OmniGen2"
    assert _post_json(api, "/v1/images/generations", {"prompt": "x", "n": 0})[0] == 400
    assert _post_json(api, "/v1/images/generations", {"prompt": "x", "size": "16x16", **SMALL})[0] == 200
    metrics = api.metrics()
    route = "/v1/images/generations"
    assert (sample(metrics, "omnigen2_http_requests_total", method="POST", route=route, status="400") or 0) > 0
    # each HTTP request is a gRPC call too
    assert (sample(metrics, "omnigen2_requests_total", code="OK", method="Generate") or 0) > 0


# Auth, rate limits and a stopped Triton: the gRPC statuses as HTTP statuses


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory, triton: TritonServer) -> Iterator[FrontendProcess]:
    folder = tmp_path_factory.mktemp("http-auth")
    tokens = [
        {"name": "slow", "sha256": hashlib.sha256(b"slow-token").hexdigest(), "rate_per_minute": 1, "burst": 1},
        {"name": "models-only", "sha256": hashlib.sha256(b"narrow").hexdigest(), "methods": ["GetModelInfo"]},
    ]
    (folder / "tokens.json").write_text(json.dumps({"tokens": tokens}))
    with FrontendProcess(
        triton.grpc_url, folder / "frontend.log", f"--auth-tokens={folder / 'tokens.json'}", http=True
    ) as frontend:
        yield frontend


def test_auth_statuses(guarded: FrontendProcess) -> None:
    anonymous = openai.OpenAI(base_url=guarded.http_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anonymous.models.list()
    narrow = openai.OpenAI(base_url=guarded.http_url, api_key="narrow", max_retries=0)
    assert [m.id for m in narrow.models.list()] == ["OmniGen2"]
    for scheme in ("bearer", "BEARER"):  # RFC 7235: the scheme is case-insensitive
        status, _, listed = _request(guarded, "GET", "/v1/models", headers={"Authorization": f"{scheme} narrow"})
        assert status in (200, 429), listed  # the token is known (its rate of one call a second may refuse it)
    with pytest.raises(openai.PermissionDeniedError):
        narrow.images.generate(prompt="x", size="16x16", extra_body=SMALL)
    slow = openai.OpenAI(base_url=guarded.http_url, api_key="slow-token", max_retries=0)
    slow.models.list()
    with pytest.raises(openai.RateLimitError) as limited:
        slow.models.list()
    assert int(limited.value.response.headers["Retry-After"]) >= 1


def _hold_a_body(port: int, headers: dict[str, str]) -> http.client.HTTPConnection:
    """A POST whose headers promise 32 MiB of JSON and whose body never comes: read, it would hang."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.putrequest("POST", "/v1/images/generations")
    for key, value in {"Content-Type": "application/json", "Content-Length": str(32 * 2**20), **headers}.items():
        connection.putheader(key, value)
    connection.endheaders()
    return connection


def test_an_unknown_token_is_refused_before_the_body_is_read(guarded: FrontendProcess) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        connection = _hold_a_body(guarded.http_port, headers)
        try:
            response = connection.getresponse()  # the socket's 10 s timeout, had the body been waited for
            assert response.status == 401 and response.getheader("WWW-Authenticate") == "Bearer"
            answer = json.loads(response.read())
            _assert_error(answer, None)
            assert answer["error"]["type"] == "authentication_error"
        finally:
            connection.close()


def test_http_and_grpc_share_one_admission(tmp_path: Path, triton: TritonServer) -> None:
    """One slot: while a gRPC stream holds it, an HTTP request is refused 429 with the RetryInfo delay as
    Retry-After (2.5 s -> 3), and served once the stream has gone."""
    flags = ("--max-in-flight=1", "--retry-after-s=2.5")
    with FrontendProcess(triton.grpc_url, tmp_path / "frontend.log", *flags, http=True) as frontend:
        http_client = openai.OpenAI(base_url=frontend.http_url, api_key="unused", max_retries=0, timeout=60)
        long_run = OmniGen2Client(frontend.address, timeout=60).stream("Busy", width=256, height=256, steps=200)
        assert isinstance(next(long_run), Progress)  # admitted and running
        with pytest.raises(openai.RateLimitError) as refused:
            http_client.images.generate(prompt="One too many", size="16x16", extra_body=SMALL)
        assert refused.value.response.headers["Retry-After"] == "3"
        long_run.close()
        deadline = time.monotonic() + 30
        while True:  # the slot comes back once the BLS has stopped the cancelled run
            try:
                assert http_client.images.generate(prompt="Room again", size="16x16", extra_body=SMALL).data
                break
            except openai.RateLimitError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        # The gateway itself holds at most max_in_flight requests with bodies: one whose body is still coming
        # holds the only place, and the next is refused unread.
        holder = _hold_a_body(frontend.http_port, {})
        deadline = time.monotonic() + 10
        try:
            while True:
                status, headers, answer = _post_json(frontend, "/v1/images/generations", {"prompt": "x", "n": "2"})
                if status == 429:
                    break
                assert status == 400 and time.monotonic() < deadline  # until the held request is in
                time.sleep(0.05)
            assert headers["Retry-After"] == "3" and "requests in flight here" in answer["error"]["message"]
            _assert_error(answer, None)
        finally:
            holder.close()


def test_a_stopped_triton_is_503(tmp_path: Path) -> None:
    with FrontendProcess(f"127.0.0.1:{free_port()}", tmp_path / "frontend.log", http=True) as frontend:
        status, headers, answer = _post_json(frontend, "/v1/images/generations", {"prompt": "x", "size": "16x16"})
    assert status == 503 and int(headers["Retry-After"]) >= 1  # UNAVAILABLE is retryable: say when
    _assert_error(answer, None)


# The curl lines of docs/api.md, as written


def test_the_curl_lines_in_the_docs_run(api: FrontendProcess, tmp_path: Path) -> None:
    section = API_DOC.read_text().split("## OpenAI-compatible HTTP API", 1)[1]
    script = re.search(r"```bash\n(.*?)```", section, re.DOTALL)
    assert script is not None
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script[1].replace("127.0.0.1:8080", f"127.0.0.1:{api.http_port}")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "apple.png").size == (256, 256)
    assert Image.open(tmp_path / "green.png").size == (256, 256)  # one input image, no size: the input's size
    assert result.stdout.rstrip().endswith("data: [DONE]")

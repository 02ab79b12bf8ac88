"""The OpenAI-compatible HTTP API's two pure halves: bodies -> API messages (shapes and types only), and gRPC
statuses -> HTTP errors; and the streamed image events for results a served test cannot force (some of n images
withheld). The served routes are tested in tests/integration/test_openai_http.py."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.rpc import error_details_pb2
from grpc.aio import AioRpcError, Metadata
from omnigen2.v1 import omnigen2_pb2 as pb

from serving.frontend.config import FrontendConfig
from serving.frontend.metrics import Metrics
from serving.frontend.openai_answers import image_answer, image_usage
from serving.frontend.openai_errors import OpenAIError, from_rpc
from serving.frontend.openai_http import OpenAIGateway
from serving.frontend.openai_requests import chat_call, enum_names, image_call
from serving.frontend.status import ApiError, invalid_argument, make_status, plain, resource_exhausted


def _rpc_error(error: ApiError) -> AioRpcError:
    """What the gateway's channel raises for a status the service ends a call with."""
    status = error.status
    return AioRpcError(status.code, Metadata(), Metadata(*status.trailing_metadata), status.details)


def test_image_fields_by_their_grpc_and_diffusers_names() -> None:
    body = {
        "prompt": "a cat",
        "n": 2,
        "size": "64x48",
        "num_inference_steps": 3,
        "guidance_scale": 4,
        "image_guidance_scale": 1.5,
        "cfg_range": [0, 0.5],
        "scheduler": "dpmsolver",
        "output_format": "jpg",
        "negative_prompt": "blur",
        "seed": 2**40,
        "max_sequence_length": 128,
    }
    call = image_call(body, [b"png"])
    request = call.request
    assert (request.width, request.height, request.num_images_per_prompt, request.steps) == (64, 48, 2, 3)
    assert (request.text_guidance_scale, request.image_guidance_scale) == (4.0, 1.5)
    assert (request.cfg_range.start, request.cfg_range.end) == (0.0, 0.5)
    assert request.scheduler == pb.SCHEDULER_DPMSOLVER and request.output_format == pb.IMAGE_FORMAT_JPEG
    assert (request.seed, request.max_sequence_length, request.negative_prompt) == (2**40, 128, "blur")
    assert [image.data for image in request.input_images] == [b"png"]
    names = call.names
    assert [names.param(f) for f in ("steps", "num_images_per_prompt", "height", "input_images[1].data")] == [
        "num_inference_steps",
        "n",
        "size",
        "image[1]",
    ]
    unset = image_call({"prompt": "x", "size": "auto", "seed": None}, []).request
    assert not unset.HasField("width") and not unset.HasField("seed")


def test_multipart_text_values_take_the_field_types() -> None:
    fields = {"prompt": "x", "n": "2", "cfg_range": ["0", "0.5"], "seed": "+7", "text_guidance_scale": "3.5"}
    request = image_call(fields, [], form=True).request
    assert (request.num_images_per_prompt, request.seed, request.text_guidance_scale) == (2, 7, 3.5)
    assert (request.cfg_range.start, request.cfg_range.end) == (0.0, 0.5)
    assert image_call({"cfg_range": ["[0.1, 0.9]"]}, [], form=True).request.cfg_range.end == 0.9


def test_enum_names_come_from_the_proto() -> None:
    assert enum_names(pb.ImageFormat.DESCRIPTOR) == {"png": 1, "jpeg": 2, "webp": 3}
    assert enum_names(pb.Scheduler.DESCRIPTOR) == {"euler": 1, "dpmsolver": 2}


@pytest.mark.parametrize(
    ("body", "status", "param", "code"),
    [
        ({"prompt": "x", "foo": 1}, 400, "foo", "unknown_parameter"),
        ({"prompt": "x", "steps": 2, "num_inference_steps": 2}, 400, "num_inference_steps", "invalid_value"),
        ({"prompt": "x", "n": True}, 400, "n", "invalid_type"),
        ({"prompt": "x", "n": 2**31}, 400, "n", "invalid_value"),
        ({"prompt": "x", "size": "1024"}, 400, "size", "invalid_value"),
        ({"prompt": "x", "size": 1024}, 400, "size", "invalid_value"),
        ({"prompt": "x", "response_format": "url"}, 400, "response_format", "invalid_value"),
        ({"prompt": "x", "model": "dall-e-3"}, 404, "model", "model_not_found"),
        ({"prompt": "x", "cfg_range": [0]}, 400, "cfg_range", "invalid_type"),
        ({"prompt": "x", "guidance_scale": "high"}, 400, "guidance_scale", "invalid_type"),
        ({"prompt": "x", "scheduler": "ddim"}, 400, "scheduler", "invalid_value"),
        ({"prompt": "x", "previews": True}, 400, "previews", "unknown_parameter"),
        ({"prompt": "x", "preview_every": 2}, 400, "preview_every", "unknown_parameter"),
        ({"prompt": "x", "stream": "yes"}, 400, "stream", "invalid_type"),
        ({"prompt": "x", "stream": True, "partial_images": 4}, 400, "partial_images", "invalid_value"),
        ({"prompt": "x", "stream": True, "partial_images": -1}, 400, "partial_images", "invalid_value"),
        ({"prompt": "x", "stream": True, "partial_images": 1.5}, 400, "partial_images", "invalid_type"),
        ({"prompt": "x", "partial_images": 2}, 400, "partial_images", "invalid_value"),
        ({"prompt": "x", "stream": True, "partial_images": 1, "n": 2}, 400, "n", "invalid_value"),
        ({"prompt": ["x"]}, 400, "prompt", "invalid_type"),
        ({"prompt": "\ud800"}, 400, "prompt", "invalid_value"),  # what JSON's "\ud800" escape decodes to
    ],
)
def test_image_bodies_refused_naming_the_field(body: dict[str, Any], status: int, param: str, code: str) -> None:
    with pytest.raises(OpenAIError) as refused:
        image_call(body, [])
    assert (refused.value.status, refused.value.param, refused.value.code) == (status, param, code)


@pytest.mark.parametrize(
    ("steps", "partial_images", "every"), [(None, 3, 16), (50, 1, 49), (3, 2, 1), (2, 3, 1), (1, 1, 1)]
)
def test_partial_images_spread_the_previews_over_the_steps(steps: int | None, partial_images: int, every: int) -> None:
    """At least `partial_images` previews before the last step when the steps allow (the default is 50 steps)."""
    body = {"prompt": "x", "stream": True, "partial_images": partial_images, "steps": steps}
    call = image_call(body, [])
    assert (call.stream, call.partial_images) == (True, partial_images)
    assert call.request.previews and call.request.preview_every == every
    total = steps or 50
    assert len(range(every, total, every)) >= min(partial_images, total - 1)


def test_streaming_without_partial_images_asks_no_previews() -> None:
    call = image_call({"prompt": "x", "stream": "true", "partial_images": "0", "n": "2"}, [], form=True)
    assert call.stream and call.partial_images == 0 and call.request.num_images_per_prompt == 2
    assert not call.request.previews and not call.request.HasField("preview_every")


def test_image_answer_keeps_the_seed_the_withheld_images_and_the_cache_that_ran() -> None:
    finding = pb.SafetyFinding(label="FEMALE_BREAST_EXPOSED", score=0.9, threshold=0.5)
    response = pb.GenerateResponse(
        images=[pb.Image(data=b"png", mime_type="image/png", width=16, height=8)],
        seed=42,
        withheld=[pb.WithheldImage(index=1, findings=[finding])],
        cache=pb.STEP_CACHE_NONE,
        cache_note="the tensorrt backend runs uncached",
    )
    answer = image_answer(response)
    assert (answer["seed"], answer["size"], answer["output_format"]) == (42, "16x8", "png")
    assert answer["withheld"] == [
        {"index": 1, "findings": [{"label": "FEMALE_BREAST_EXPOSED", "score": 0.9, "threshold": 0.5}]}
    ]
    assert (answer["cache"], answer["cache_note"]) == ("none", "the tensorrt backend runs uncached")
    taylor = image_answer(pb.GenerateResponse(cache=pb.STEP_CACHE_TAYLORSEER))
    assert (taylor["withheld"], taylor["cache"], taylor["cache_note"]) == ([], "taylorseer", "")


def test_image_usage_adds_text_and_image_tokens_as_input_and_shares_the_output_per_image() -> None:
    usage = pb.GenerateUsage(text_tokens=110, image_tokens=12, output_tokens=36)
    assert image_answer(pb.GenerateResponse(usage=usage))["usage"] == {
        "total_tokens": 158,
        "input_tokens": 122,
        "output_tokens": 36,
        "input_tokens_details": {"text_tokens": 110, "image_tokens": 12},
    }
    first, second = image_usage(usage, 3), image_usage(usage, 3, with_input=False)  # completed events of 3 images
    assert (first["output_tokens"], first["input_tokens"], first["total_tokens"]) == (12, 122, 134)
    assert (second["output_tokens"], second["input_tokens"], second["total_tokens"]) == (12, 0, 12)


def _streamed(response: pb.GenerateResponse) -> list[tuple[str | None, dict[str, Any]]]:
    """The gateway's events for a GenerateStream whose first event is already the result."""
    gateway = OpenAIGateway(FrontendConfig(), "unix:unused", Metrics())
    call = image_call({"prompt": "x", "stream": True}, [])

    async def no_more() -> AsyncIterator[pb.GenerateEvent]:
        return
        yield

    async def collect() -> list[tuple[str | None, dict[str, Any]]]:
        first = pb.GenerateEvent(result=response)
        return [event async for event in gateway._image_events(call, "image_generation", first, no_more())]

    return asyncio.run(collect())


def test_a_streamed_image_the_safety_classifier_withheld_completes_without_pixels() -> None:
    finding = pb.SafetyFinding(label="BELLY_EXPOSED", score=0.25, threshold=0.0)
    kept = [pb.Image(data=data, mime_type="image/png", width=16, height=16) for data in (b"first", b"third")]
    usage = pb.GenerateUsage(text_tokens=50, output_tokens=3)
    response = pb.GenerateResponse(
        images=kept, seed=5, usage=usage, withheld=[pb.WithheldImage(index=1, findings=[finding])]
    )
    events = _streamed(response)
    assert [name for name, _ in events] == ["image_generation.completed"] * 3  # one per image, in order
    (_, first), (_, withheld), (_, third) = events
    assert [base64.b64decode(e["b64_json"]) for e in (first, third)] == [b"first", b"third"]
    assert "b64_json" not in withheld and withheld["seed"] == 5
    assert withheld["withheld"] == {"index": 1, "findings": [{"label": "BELLY_EXPOSED", "score": 0.25, "threshold": 0}]}
    assert [event["usage"]["output_tokens"] for _, event in events] == [1, 1, 1]
    assert [event["usage"]["input_tokens"] for _, event in events] == [50, 0, 0]  # the input counted once


def test_a_stream_whose_every_image_is_withheld_ends_with_a_content_policy_error() -> None:
    finding = pb.SafetyFinding(label="BELLY_EXPOSED", score=0.25, threshold=0.0)
    withheld = [pb.WithheldImage(index=i, findings=[finding]) for i in range(2)]
    ((name, event),) = _streamed(pb.GenerateResponse(seed=5, withheld=withheld))
    assert name == event["type"] == "error"
    assert event["error"]["code"] == "content_policy_violation" and event["error"]["param"] is None
    assert [w["index"] for w in event["withheld"]] == [0, 1]


def test_chat_messages_become_an_understand_request() -> None:
    url = "data:image/png;base64,aGVsbG8="
    body = {
        "model": "omnigen2",
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}],
            },
            {"role": "assistant", "content": None},
        ],
        "max_completion_tokens": 5,
        "stop": "\n",
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    call = chat_call(body)
    request = call.request
    assert [m.role for m in request.messages] == [pb.ROLE_SYSTEM, pb.ROLE_USER, pb.ROLE_ASSISTANT]
    assert request.messages[1].content[0].image.data == b"hello"
    assert (request.max_new_tokens, list(request.stop), call.stream, call.include_usage) == (5, ["\n"], True, True)
    assert call.names.param("max_new_tokens") == "max_completion_tokens"
    assert call.names.param("messages[1].content[0].image.data") == "messages[1].content[0].image_url"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "https://x/a.png"}]}]},
            "messages[0].content[0].image_url",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "data:image/png,raw"}]}]},
            "messages[0].content[0].image_url",
        ),
        ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "messages[0].content[0]"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages[0].tool_calls"),
        ({"messages": [], "n": 2}, "n"),
        ({"messages": [], "max_tokens": 1, "max_completion_tokens": 1}, "max_completion_tokens"),
        ({"messages": [], "stop": [1]}, "stop"),
        ({"messages": [], "stream": "yes"}, "stream"),
        ({"messages": [], "stream_options": {"include_usage": True}}, "stream_options"),  # before: taken
        ({"messages": [], "stream": False, "stream_options": {}}, "stream_options"),
        ({"messages": {}}, "messages"),
    ],
)
def test_chat_bodies_refused_naming_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(OpenAIError) as refused:
        chat_call(body)
    assert refused.value.status == 400 and refused.value.param == param


def test_grpc_statuses_become_http_statuses() -> None:
    same = str
    violations = [("num_images_per_prompt", "must be in [1, 4]"), ("steps", "at least 1")]
    bad = from_rpc(_rpc_error(invalid_argument(violations)), lambda f: {"num_images_per_prompt": "n"}.get(f, f))
    assert (bad.status, bad.param, bad.message) == (400, "n", "n: must be in [1, 4]; steps: at least 1")
    both_sides = [("width", "must be in [1, 4096], got 5000"), ("height", "must be in [1, 4096], got 6000")]
    size = from_rpc(_rpc_error(invalid_argument(both_sides)), lambda f: {"width": "size", "height": "size"}.get(f, f))
    assert (size.param, size.message) == (
        "size",
        "size (width): must be in [1, 4096], got 5000; size (height): must be in [1, 4096], got 6000",
    )
    slow_reader = from_rpc(_rpc_error(plain(grpc.StatusCode.RESOURCE_EXHAUSTED, "buffered too much")), same)
    assert (slow_reader.status, slow_reader.headers) == (429, {})  # no RetryInfo: no Retry-After
    busy = from_rpc(_rpc_error(resource_exhausted("busy", 1.5)), same)
    assert (busy.status, busy.headers, busy.body()["error"]["code"]) == (
        429,
        {"Retry-After": "2"},
        "rate_limit_exceeded",
    )
    for code, status in [
        (grpc.StatusCode.UNAUTHENTICATED, 401),
        (grpc.StatusCode.PERMISSION_DENIED, 403),
        (grpc.StatusCode.UNAVAILABLE, 503),
        (grpc.StatusCode.DEADLINE_EXCEEDED, 504),
        (grpc.StatusCode.INTERNAL, 500),
    ]:
        assert from_rpc(_rpc_error(plain(code, "m")), same).status == status
    down = from_rpc(_rpc_error(plain(grpc.StatusCode.UNAVAILABLE, "inference server unavailable")), same, 2.5)
    assert (down.status, down.headers) == (503, {"Retry-After": "3"})  # retryable: --retry-after-s
    hinted = ApiError(
        make_status(
            grpc.StatusCode.UNAVAILABLE,
            "restarting",
            error_details_pb2.RetryInfo(retry_delay=Duration(seconds=7)),
        )
    )
    assert from_rpc(_rpc_error(hinted), same, 2.5).headers == {"Retry-After": "7"}  # its own RetryInfo
    policy = ApiError(
        make_status(
            grpc.StatusCode.PERMISSION_DENIED,
            "refused by rule r1",
            error_details_pb2.ErrorInfo(reason="r1", metadata={"field": "text_guidance_scale"}),
        )
    )
    refused = from_rpc(_rpc_error(policy), lambda f: {"text_guidance_scale": "guidance_scale"}.get(f, f))
    assert (refused.status, refused.code, refused.param) == (400, "content_policy_violation", "guidance_scale")

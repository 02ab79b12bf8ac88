"""OpenAI request bodies with values of the wrong type or out of every range (serving/frontend/openai_requests.py):
each is refused 400 naming the field. Before, a JSON integer past float's range in a number field was a 500
(OverflowError), and chat took `stream: 0`, `stop: false`, `n: true`, `stream_options: []` as unset, and forms and
`size` took other scripts' digits."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from serving.frontend.convert import to_chat_forward
from serving.frontend.openai_errors import OpenAIError
from serving.frontend.openai_requests import chat_call, image_call
from serving.frontend.status import ApiError
from serving.pipeline.chat_request import DEFAULT_CHAT_LIMITS

HUGE = int("9" * 400)  # what json.loads makes of 400 nines
CHAT = {"messages": [{"role": "user", "content": "x"}]}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"text_guidance_scale": HUGE}, "text_guidance_scale"),
        ({"guidance_scale": -HUGE}, "guidance_scale"),
        ({"image_guidance_scale": HUGE}, "image_guidance_scale"),
        ({"teacache_threshold": HUGE}, "teacache_threshold"),
        ({"cfg_range": [0, HUGE]}, "cfg_range"),
        ({"steps": HUGE}, "steps"),
        ({"n": HUGE}, "n"),
        ({"seed": HUGE}, "seed"),
        ({"stream": True, "partial_images": HUGE}, "partial_images"),
        ({"size": "\u0666\u0664x\u0666\u0664"}, "size"),
    ],
)
def test_image_numbers_out_of_every_range_are_refused(body: dict[str, Any], param: str) -> None:
    with pytest.raises(OpenAIError) as refused:
        image_call({"prompt": "x", **body}, [])
    assert (refused.value.status, refused.value.param) == (400, param)
    assert len(refused.value.message) < 200  # the value is shown cut short


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": "\u0666\u0664"}, "n"),
        ({"seed": "\u0667"}, "seed"),
        ({"text_guidance_scale": "\u0663.\u0665"}, "text_guidance_scale"),
        ({"text_guidance_scale": "1_0"}, "text_guidance_scale"),
        ({"text_guidance_scale": "9" * 400}, "text_guidance_scale"),
        ({"cfg_range": ["0", "\u0661"]}, "cfg_range"),
    ],
)
def test_form_numbers_take_ascii_digits_only(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(OpenAIError) as refused:
        image_call({"prompt": "x", **fields}, [], form=True)
    assert (refused.value.status, refused.value.param) == (400, param)


def test_form_numbers_in_their_usual_spellings_are_taken() -> None:
    fields = {"prompt": "x", "n": " 2", "text_guidance_scale": "-.5e1", "image_guidance_scale": "2.", "seed": "+7"}
    request = image_call(fields, [], form=True).request
    assert (request.num_images_per_prompt, request.text_guidance_scale) == (2, -5.0)
    assert (request.image_guidance_scale, request.seed) == (2.0, 7)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"temperature": HUGE}, "temperature"),
        ({"top_p": -HUGE}, "top_p"),
        ({"max_tokens": HUGE}, "max_tokens"),
        ({"seed": HUGE}, "seed"),
        ({"stream": 0}, "stream"),
        ({"stream": 1}, "stream"),
        ({"stream": ""}, "stream"),
        ({"stop": False}, "stop"),
        ({"stop": 0}, "stop"),
        ({"n": True}, "n"),
        ({"n": 1.0}, "n"),
        ({"n": 0}, "n"),
        ({"stream_options": []}, "stream_options"),
        ({"stream_options": 0}, "stream_options"),
        ({"stream_options": {"include_usage": 0}}, "stream_options.include_usage"),
        ({"user": 5}, "user"),
    ],
)
def test_chat_values_of_the_wrong_type_or_range_are_refused(body: dict[str, Any], param: str) -> None:
    with pytest.raises(OpenAIError) as refused:
        chat_call({**CHAT, **body})
    assert (refused.value.status, refused.value.param) == (400, param)


def test_chat_nulls_and_empty_lists_are_unset() -> None:
    body = {**CHAT, "stream": None, "stop": [], "n": 1, "user": None}
    call = chat_call(body)
    assert (call.stream, call.include_usage, list(call.request.stop)) == (False, False, [])
    assert chat_call({**CHAT, "stream": True, "stream_options": {"include_usage": None}}).include_usage is False
    assert chat_call({**CHAT, "n": None, "stop": None, "stream_options": None}).stream is False


def test_chat_lone_empty_stop_string_is_unset() -> None:
    # 949e9b0 refused it (400 from the stop strings' 1..64 characters), though OpenAI's schema takes any string.
    assert list(chat_call({**CHAT, "stop": ""}).request.stop) == []
    # In a list it is a stop string of no characters, refused as before (INVALID_ARGUMENT: HTTP 400).
    request = chat_call({**CHAT, "stop": ["\n", ""]}).request
    with pytest.raises(ApiError) as refused:
        to_chat_forward(request, DEFAULT_CHAT_LIMITS)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert str(refused.value).startswith("stop: ")

"""The gRPC service's answers -> OpenAI's response bodies and server-sent events (images and chat completions)."""

from __future__ import annotations

import base64
import time
from typing import Any

from omnigen2.v1 import omnigen2_pb2 as pb

from serving.frontend.openai_errors import OpenAIError
from serving.frontend.openai_requests import MODEL_ID, enum_names

_CACHE_NAMES = {number: name for name, number in enum_names(pb.StepCache.DESCRIPTOR).items()}


def image_answer(response: pb.GenerateResponse) -> dict[str, Any]:
    """The images response (b64_json) with the request's token `usage`, OmniGen2's seed (pass it back to reproduce
    the images), the images the safety classifier withheld (not in `data`), and the step caching that ran
    (`cache_note`: why it is not the one asked for). OpenAI's clients ignore the fields they do not know."""
    first = response.images[0] if response.images else pb.Image()
    return {
        "created": int(time.time()),
        "data": [{"b64_json": base64.b64encode(image.data).decode()} for image in response.images],
        "output_format": first.mime_type.removeprefix("image/"),
        "size": f"{first.width}x{first.height}",
        "usage": image_usage(response.usage),
        "seed": response.seed,
        "withheld": [withheld_entry(image) for image in response.withheld],
        "cache": _CACHE_NAMES.get(response.cache, "none"),
        "cache_note": response.cache_note,
    }


def image_usage(usage: pb.GenerateUsage, images: int = 1, with_input: bool = True) -> dict[str, Any]:
    """OpenAI's image `usage`; input tokens are the text's and the input images'. With `images` > 1, one image's
    share of the output (a completed event is one image's), beside the request's input where `with_input` (the
    first event only, so that the events add up to the request's usage)."""
    text, reference = (usage.text_tokens, usage.image_tokens) if with_input else (0, 0)
    output = usage.output_tokens // max(images, 1)
    return {
        "total_tokens": text + reference + output,
        "input_tokens": text + reference,
        "output_tokens": output,
        "input_tokens_details": {"text_tokens": text, "image_tokens": reference},
    }


def withheld_entry(image: pb.WithheldImage) -> dict[str, Any]:
    return {
        "index": image.index,
        "findings": [  # float32 on the wire: 0.9, not 0.8999999761581543
            {"label": f.label, "score": round(f.score, 6), "threshold": round(f.threshold, 6)} for f in image.findings
        ],
    }


def withheld_event(route: str, image: pb.WithheldImage, seed: int, usage: dict[str, Any]) -> dict[str, Any]:
    """A streamed image's completed event in the place of one the safety classifier withheld: no b64_json, and
    `withheld` says which image and why, so a streaming caller sees each of the n images accounted for."""
    return {
        "type": f"{route}.completed",
        "created_at": int(time.time()),
        "usage": usage,
        "seed": seed,
        "withheld": withheld_entry(image),
    }


def all_withheld_error(response: pb.GenerateResponse) -> dict[str, Any]:
    """The stream's `error` event when the safety classifier withheld every image: there is no image to complete,
    and OpenAI's clients raise it (as OpenAI's own image streams end on a refusal)."""
    failure = OpenAIError(
        400, "the safety classifier withheld every image (see `withheld`)", code="content_policy_violation"
    )
    return {"type": "error", **failure.body(), "withheld": [withheld_entry(image) for image in response.withheld]}


def image_event(
    route: str,
    image: pb.Image,
    partial_index: int | None = None,
    seed: int | None = None,
    usage: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One server-sent event of a streamed image answer: `route` is image_generation or image_edit; a partial image
    (a preview, PNG) with its index, or a completed image with its token `usage` and OmniGen2's seed."""
    event: dict[str, Any] = {
        "type": f"{route}.partial_image" if partial_index is not None else f"{route}.completed",
        "b64_json": base64.b64encode(image.data).decode(),
        "created_at": int(time.time()),
        "size": f"{image.width}x{image.height}",
        "quality": "auto",
        "background": "opaque",
        "output_format": image.mime_type.removeprefix("image/"),
    }
    if partial_index is not None:
        event["partial_image_index"] = partial_index
    if usage is not None:
        event["usage"] = usage
    if seed is not None:
        event["seed"] = seed
    return event


_FINISH = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_STOP_STRING: "stop",
    pb.FINISH_REASON_LENGTH: "length",
}


def completion_id(request_id: str) -> str:
    return f"chatcmpl-{request_id}"


def usage(result: pb.UnderstandResult) -> dict[str, int]:
    prompt, completion = result.usage.prompt_tokens, result.usage.completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def chat_answer(result: pb.UnderstandResult, request_id: str) -> dict[str, Any]:
    return {
        "id": completion_id(request_id),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": MODEL_ID,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.text},
                "finish_reason": _FINISH.get(result.finish_reason, "stop"),
            }
        ],
        "usage": usage(result),
        "seed": result.seed,
    }


def chat_chunk(
    request_id: str,
    delta: dict[str, str] | None,
    finish: pb.UnderstandResult | None = None,
    with_usage: pb.UnderstandResult | None = None,
) -> dict[str, Any]:
    """One server-sent event of a streamed answer: a delta, the finish reason, or (no choices) the usage."""
    chunk: dict[str, Any] = {
        "id": completion_id(request_id),
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": MODEL_ID,
        "choices": [],
    }
    if delta is not None or finish is not None:
        reason = _FINISH.get(finish.finish_reason, "stop") if finish is not None else None
        chunk["choices"] = [{"index": 0, "delta": delta or {}, "finish_reason": reason}]
    if with_usage is not None:
        chunk["usage"] = usage(with_usage)
    return chunk

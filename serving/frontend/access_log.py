"""One access-log line per call: who, what (shapes and sizes only), status and time. Never prompt text, image
bytes or tokens: requests may hold personal data."""

from __future__ import annotations

import logging

from google.protobuf.message import Message
from omnigen2.v1 import omnigen2_pb2 as pb

log = logging.getLogger("omnigen2.access")
_MAX_WALKED = 1024  # repeated elements a line describes one by one; over the API's limits, so refused anyway


def describe(request: Message | None) -> str:
    if isinstance(request, pb.GenerateRequest):
        if len(request.input_images) > _MAX_WALKED:  # refused by its count: not walked (a refusal stays cheap)
            return f"prompt_chars={len(request.prompt)} images={len(request.input_images)}"
        size = f"{request.width}x{request.height}" if request.HasField("width") or request.HasField("height") else "-"
        image_bytes = sum(len(image.data) for image in request.input_images)
        steps = request.steps if request.HasField("steps") else "-"
        return (
            f"prompt_chars={len(request.prompt)} images={len(request.input_images)} image_bytes={image_bytes} "
            f"size={size} steps={steps}"
        )
    if isinstance(request, pb.UnderstandRequest):
        if len(request.messages) > _MAX_WALKED or sum(len(m.content) for m in request.messages) > _MAX_WALKED:
            return f"messages={len(request.messages)}"
        parts = [part for message in request.messages for part in message.content]
        images = [part.image for part in parts if part.HasField("image")]
        text_chars = sum(len(part.text) for part in parts)
        return (
            f"messages={len(request.messages)} images={len(images)} "
            f"image_bytes={sum(len(i.data) for i in images)} text_chars={text_chars}"
        )
    return ""


def record(
    method: str, peer: str, client: str, code: str, seconds: float, described: str = "", request_id: str = "-"
) -> None:
    """`described`: describe(request), read where the caller chose (it copies the request's image bytes)."""
    log.info(
        "%s peer=%s client=%s status=%s seconds=%.3f request_id=%s %s",
        method,
        peer,
        client,
        code,
        seconds,
        request_id,
        described,
    )


def record_http(method: str, route: str, peer: str, status: int, seconds: float, request_id: str) -> None:
    """One line per OpenAI-compatible HTTP request; the gRPC call it made has its own line, with the same id."""
    line = "HTTP %s %s peer=%s status=%d seconds=%.3f request_id=%s"
    log.info(line, method, route, peer, status, seconds, request_id)

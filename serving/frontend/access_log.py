"""One access-log line per call: who, what (shapes and sizes only), status and time. Never prompt text, image
bytes or tokens: requests may hold personal data.

A field whose text a caller chooses (a method, a peer, a client or request id) is written as it is only when plain;
otherwise it is quoted with JSON's escapes, so that no space, quote, line break or control character in it can end
the field or the line: one line is one record of the fields it names."""

from __future__ import annotations

import json
import logging
import re

from google.protobuf.message import Message
from omnigen2.v1 import omnigen2_pb2 as pb

log = logging.getLogger("omnigen2.access")
_MAX_WALKED = 1024  # repeated elements a line describes one by one; over the API's limits, so refused anyway
_PLAIN = re.compile(r"[\w.:/+=@\[\]-]+", re.ASCII)  # peers (ipv6:[::1]:5000, unix:/path), names, ids


def _field(text: str) -> str:
    return text if _PLAIN.fullmatch(text) else json.dumps(text)  # ensure_ascii: nothing but printable ASCII


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
        _field(method),
        _field(peer),
        _field(client),
        code,
        seconds,
        _field(request_id),
        described,
    )


def record_http(method: str, route: str, peer: str, status: int, seconds: float, request_id: str) -> None:
    """One line per OpenAI-compatible HTTP request; the gRPC call it made has its own line, with the same id."""
    line = "HTTP %s %s peer=%s status=%d seconds=%.3f request_id=%s"
    log.info(line, _field(method), _field(route), _field(peer), status, seconds, _field(request_id))

"""check_request_size: a request over the limit is named by its largest field, in bounded time and memory."""

from __future__ import annotations

import os
import time

import pytest
from google.protobuf.message import Message
from omnigen2.v1 import omnigen2_pb2 as pb

from benchmarks.proc_memory import proc_status_kib, reset_peak
from serving.frontend.request_size import check_request_size
from serving.frontend.status import ApiError

MiB = 2**20


def _refusal(request: Message, limit: int = MiB) -> str:
    with pytest.raises(ApiError) as raised:
        check_request_size(request, limit)
    return raised.value.status.details


def _question(text: str) -> pb.ChatMessage:
    return pb.ChatMessage(role=pb.ROLE_USER, content=[pb.ContentPart(text=text)])


def _unknown_field(size: int) -> bytes:
    """The wire bytes of a message holding only field 1000 (no message here has it), `size` bytes long."""

    def varint(value: int) -> bytes:
        out = bytearray()
        while value > 0x7F:
            out.append(value & 0x7F | 0x80)
            value >>= 7
        return bytes(out) + bytes([value])

    return varint(1000 << 3 | 2) + varint(size) + bytes(size)


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.GenerateRequest(prompt="x", input_images=[pb.Image(data=bytes(800_000)), pb.Image(data=bytes(400_000))]),
         "input_images[0].data"),
        (pb.GenerateRequest(prompt="x" * 1_200_000), "prompt"),
        (pb.GenerateRequest(prompt="x", negative_prompt="y" * 1_200_000), "negative_prompt"),
        (pb.GenerateRequest(prompt="x", input_images=[pb.Image(data=bytes(30_000))] * 40), "input_images"),
        (pb.UnderstandRequest(messages=[_question("x" * 1_100_000)]), "messages[0].content[0].text"),
        (pb.UnderstandRequest(messages=[_question("q")], stop=["s" * 20] * 100_000), "stop"),
        # Text is sized in its UTF-8 bytes: 500 000 characters of 3 bytes each outweigh a 1 MB image.
        (pb.GenerateRequest(prompt="字" * 500_000, input_images=[pb.Image(data=bytes(1_000_000))]), "prompt"),
        # Unknown fields only (a newer client's): the message that holds them is named.
        (pb.GenerateRequest(prompt="x", input_images=[pb.Image.FromString(_unknown_field(1_200_000))]),
         "input_images[0]"),
        (pb.GenerateRequest.FromString(_unknown_field(1_200_000)), "request"),
    ],
)  # fmt: skip
def test_the_largest_field_is_named(request_: Message, field: str) -> None:
    assert _refusal(request_).startswith(f"{field}: the request is")


def test_many_tiny_fields_are_named_as_a_whole_quickly() -> None:
    started = time.monotonic()
    details = _refusal(pb.GenerateRequest(prompt="x", input_images=[pb.Image()] * 600_000))
    assert details.startswith("input_images: the request is") and time.monotonic() - started < 2


def _peak_mib() -> int:
    return proc_status_kib(os.getpid(), "VmHWM") // 1024


def test_naming_the_field_adds_nothing_to_what_byte_size_holds() -> None:
    """A 100 MiB image over the limit: the check peaked at 4x the message (a copy cleared field by field, a copy of
    the image, its bytes read out), on top of the copies gRPC holds. Now 2x: upb's ByteSize, used for the total,
    serializes (and so does the image's), and the image's bytes are read once."""
    wire = pb.GenerateRequest(prompt="x", input_images=[pb.Image(data=bytes(100 * MiB))]).SerializeToString()
    request = pb.GenerateRequest.FromString(wire)
    del wire
    reset_peak(os.getpid())
    before = _peak_mib()
    assert _refusal(request, 64 * MiB).startswith("input_images[0].data: the request is")
    assert _peak_mib() - before < 250  # before: 400

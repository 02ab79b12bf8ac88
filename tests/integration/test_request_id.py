"""A call's request id: taken from the caller's `x-request-id` (or made), returned in the response metadata,
written in the front end's access log and in Triton's log by the model that failed, so one failure can be followed
across both logs."""

from __future__ import annotations

import io
import re
import time
from collections.abc import Callable

import grpc
import pytest
from omnigen2.v1 import omnigen2_pb2 as pb
from omnigen2.v1 import omnigen2_pb2_grpc as pb_grpc
from PIL import Image

from serving.frontend.process import FrontendProcess
from serving.triton.launcher import TritonServer


def _stub(api: FrontendProcess) -> pb_grpc.OmniGen2Stub:
    return pb_grpc.OmniGen2Stub(grpc.insecure_channel(api.address))


def _returned_id(call: grpc.Call) -> str:
    return dict(call.initial_metadata())["x-request-id"]


def _wait_for_line(read: Callable[[], str], pattern: str, timeout_s: float = 10.0) -> str:
    """Log lines are written after the response: wait briefly for the line instead of racing it."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = re.search(pattern, read())
        if found or time.monotonic() > deadline:
            assert found, f"no log line matching {pattern!r}"
            return found.group(0)
        time.sleep(0.1)


def test_the_callers_request_id_is_returned_and_logged(api: FrontendProcess) -> None:
    request = pb.GenerateRequest(prompt="A red door", width=32, height=32, steps=1, seed=1)
    _, call = _stub(api).Generate.with_call(request, metadata=[("x-request-id", "it-test-4711")], timeout=60)
    assert _returned_id(call) == "it-test-4711"
    _wait_for_line(api.log_path.read_text, r"Generate peer=\S+ .* status=OK .* request_id=it-test-4711 ")


@pytest.mark.parametrize("sent", [None, "not a token: spaces", "x" * 129])
def test_a_missing_or_unusable_id_is_replaced_by_a_new_one(api: FrontendProcess, sent: str | None) -> None:
    metadata = [] if sent is None else [("x-request-id", sent)]
    with pytest.raises(grpc.RpcError) as raised:  # an invalid request: the id comes back with errors too
        _stub(api).Generate(pb.GenerateRequest(prompt=""), metadata=metadata, timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    made = _returned_id(raised.value)
    assert re.fullmatch(r"[0-9a-f]{32}", made)
    _wait_for_line(api.log_path.read_text, rf"status=INVALID_ARGUMENT .* request_id={made} ")


def test_a_failure_in_the_bls_is_found_in_both_logs(api: FrontendProcess, triton: TritonServer) -> None:
    """A PNG cut short in its pixel data passes the front end, which reads headers only; the BLS, decoding it, refuses
    it and logs that under the id the access log has. (Images too small for the model are now refused up front.)"""
    whole = io.BytesIO()
    Image.effect_noise((64, 64), 64).convert("RGB").save(whole, format="PNG")
    cut = whole.getvalue()[: len(whole.getvalue()) // 2]
    request = pb.GenerateRequest(prompt="Bigger", input_images=[pb.Image(data=cut)], steps=1)
    with pytest.raises(grpc.RpcError) as raised:
        _stub(api).Generate(request, metadata=[("x-request-id", "it-bls-failure-1")], timeout=60)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    _wait_for_line(api.log_path.read_text, r"status=INVALID_ARGUMENT .* request_id=it-bls-failure-1 ")
    _wait_for_line(
        lambda: triton.log_path.read_text(errors="replace"),
        r"request_id=it-bls-failure-1 ended: INVALID_ARGUMENT: images\[0\]",
    )

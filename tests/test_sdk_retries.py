"""The SDK's retry policy against a real gRPC server on loopback that is UNAVAILABLE for its first calls."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from omnigen2 import OmniGen2Client, UnavailableError
from omnigen2.v1 import omnigen2_pb2 as pb
from omnigen2.v1 import omnigen2_pb2_grpc as pb_grpc


class Flaky(pb_grpc.OmniGen2Servicer):
    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.ServicerContext) -> pb.ModelInfo:  # noqa: N802
        self.calls += 1
        if self.calls <= self.failures:
            context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        return pb.ModelInfo(model="OmniGen2")


@pytest.fixture
def flaky() -> Iterator[tuple[Flaky, str]]:
    servicer = Flaky(failures=2)
    server = grpc.server(ThreadPoolExecutor(2))
    pb_grpc.add_OmniGen2Servicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)


def test_unavailable_is_retried_with_backoff(flaky: tuple[Flaky, str]) -> None:
    servicer, address = flaky
    with OmniGen2Client(address, timeout=30, retries=4) as client:
        assert client.info().model == "OmniGen2"
    assert servicer.calls == 3


def test_no_retries_when_disabled(flaky: tuple[Flaky, str]) -> None:
    servicer, address = flaky
    with OmniGen2Client(address, timeout=30, retries=0) as client, pytest.raises(UnavailableError, match="warming up"):
        client.info()
    assert servicer.calls == 1

"""The SDK's retry policy against a real gRPC server on loopback that is UNAVAILABLE for its first calls."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from omnigen2 import AsyncOmniGen2Client, OmniGen2Client, UnavailableError
from omnigen2.cli import main
from omnigen2.v1 import omnigen2_pb2 as pb
from omnigen2.v1 import omnigen2_pb2_grpc as pb_grpc

from tests.frontends import fake_server


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
    with fake_server(servicer) as address:
        yield servicer, address


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


def test_attempts_are_bounded_by_retries(flaky: tuple[Flaky, str]) -> None:
    """No gRPC retry policy under the SDK's loop: a server that is always UNAVAILABLE sees retries + 1 calls."""
    servicer, address = flaky
    servicer.failures = 100
    with OmniGen2Client(address, timeout=30, retries=2) as client, pytest.raises(UnavailableError):
        client.info()
    assert servicer.calls == 3


@pytest.mark.parametrize("client_class", [OmniGen2Client, AsyncOmniGen2Client])
def test_negative_retries_are_refused(client_class: type[OmniGen2Client | AsyncOmniGen2Client]) -> None:
    with pytest.raises(ValueError, match="retries"):
        client_class("127.0.0.1:1", retries=-1)


def test_cli_refuses_negative_retries(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--retries", "-1", "info"])
    assert exited.value.code == 2 and "--retries: must be 0 or more" in capsys.readouterr().err

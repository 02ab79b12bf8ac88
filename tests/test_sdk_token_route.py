"""A bearer token is not sent in cleartext beyond this machine: without TLS, to a server that is not loopback,
localhost or a Unix socket (every replica of a list), the SDK raises ValueError naming `token`, `tls` and
`allow_plaintext_token` before it connects. Before, both clients opened the channel and sent it readable."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from omnigen2 import AsyncOmniGen2Client, OmniGen2Client
from omnigen2.client import on_this_machine
from omnigen2.v1 import omnigen2_pb2 as pb
from omnigen2.v1 import omnigen2_pb2_grpc as pb_grpc

from tests.frontends import fake_server

REMOTE = "192.0.2.1:50051"  # TEST-NET-1: never reached, the client refuses before any connection
Kind = type[OmniGen2Client] | type[AsyncOmniGen2Client]


class Authorization(pb_grpc.OmniGen2Servicer):
    """Answers GetModelInfo with the call's authorization header as the model name."""

    def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.ServicerContext) -> pb.ModelInfo:  # noqa: N802
        return pb.ModelInfo(model=dict(context.invocation_metadata()).get("authorization", ""))


@pytest.mark.parametrize("kind", [OmniGen2Client, AsyncOmniGen2Client])
@pytest.mark.parametrize("server", [REMOTE, "omnigen2.example", "127.0.0.1:1,192.0.2.1:2", "dns:///omnigen2.example"])
def test_a_token_without_tls_beyond_this_machine_is_refused(kind: Kind, server: str) -> None:
    with pytest.raises(ValueError, match=r"^token: it would go in cleartext to .*`tls`.*`allow_plaintext_token`"):
        kind(server, token="secret")


SETTINGS: list[dict[str, Any]] = [
    {"token": "secret", "allow_plaintext_token": True},
    {"token": "secret", "tls": True},
    {"token": "secret", "tls": b"-----BEGIN CERTIFICATE-----"},
    {"token": None},
]


@pytest.mark.parametrize("settings", SETTINGS)
def test_tls_the_opt_out_or_no_token_open_a_client(settings: dict[str, Any]) -> None:
    OmniGen2Client(REMOTE, **settings).close()  # a channel, not yet connected

    async def open_async() -> None:
        await AsyncOmniGen2Client(REMOTE, **settings).close()

    asyncio.run(open_async())


def test_a_token_still_goes_in_cleartext_to_loopback() -> None:
    with fake_server(Authorization()) as address, OmniGen2Client(address, token="secret", retries=0) as client:
        assert client.info().model == "Bearer secret"


@pytest.mark.parametrize(
    ("server", "local"),
    [
        ("127.0.0.1:50051", True),
        ("localhost", True),
        ("[::1]:50051", True),
        ("0.0.0.0:50051", True),
        ("[::]:50051", True),
        ("127.0.0.2:1,127.0.0.3:2", True),
        ("unix:/tmp/omnigen2.sock", True),
        ("unix-abstract:omnigen2", True),
        ("dns:///localhost:50051", True),
        ("ipv4:127.0.0.1:50051", True),
        ("192.0.2.1:50051", False),
        ("omnigen2.example:50051", False),
        ("dns:///omnigen2.example:50051", False),
        ("127.0.0.1:1,192.0.2.1:2", False),
        ("vsock:3:50051", False),
    ],
)
def test_loopback_localhost_and_unix_sockets_are_this_machine(server: str, local: bool) -> None:
    assert on_this_machine(server) is local

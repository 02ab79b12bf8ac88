"""How the SDK takes what callers commonly hand it, against an in-process gRPC stand-in: one image given bare (before,
a str path was iterated letter by letter: FileNotFoundError: 'a'), a keyword the SDK calls otherwise (before,
protobuf's "GenerateRequest has no ... field"), a host with no port (before, gRPC's 443) or a URL (before,
"Misformatted domain name"), and no server at the address (before, gRPC's words with no hint)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from omnigen2 import AsyncOmniGen2Client, OmniGen2Client, UnavailableError
from omnigen2.client import channel_target
from omnigen2.v1 import omnigen2_pb2 as pb
from omnigen2.v1 import omnigen2_pb2_grpc as pb_grpc
from PIL import Image

from tests.certificates import certificate
from tests.frontends import fake_server


class Recorder(pb_grpc.OmniGen2Servicer):
    """Keeps each request; GetModelInfo answers UNAVAILABLE in its own words, as a server whose Triton is down."""

    def __init__(self) -> None:
        self.requests: list[pb.GenerateRequest | pb.UnderstandRequest] = []

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> pb.GenerateResponse:  # noqa: N802
        self.requests.append(request)
        return pb.GenerateResponse(seed=request.seed)

    def Understand(self, request: pb.UnderstandRequest, context: grpc.ServicerContext) -> Iterator[pb.UnderstandEvent]:  # noqa: N802
        self.requests.append(request)
        yield pb.UnderstandEvent(result=pb.UnderstandResult(text="an apple"))

    def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.ServicerContext) -> pb.ModelInfo:  # noqa: N802
        context.abort(grpc.StatusCode.UNAVAILABLE, "Triton is not ready")
        raise AssertionError("unreachable: abort raises")


@pytest.fixture
def served() -> Iterator[tuple[Recorder, str]]:
    recorder = Recorder()
    with fake_server(recorder) as address:
        yield recorder, address


def test_one_image_given_bare_is_one_image(served: tuple[Recorder, str], tmp_path: Path) -> None:
    recorder, address = served
    path = tmp_path / "apple.png"
    Image.new("RGB", (8, 8), "red").save(path)
    data = path.read_bytes()
    with OmniGen2Client(address, timeout=10, retries=0) as client:
        assert client.understand("What?", str(path)).text == "an apple"
        client.generate("Make it green", str(path))
        client.compose(path, "The apple")
        client.generate("x", data)
        client.generate("x", Image.open(path))
        client.generate("x", [str(path), data])
    understood, *generated = recorder.requests
    assert isinstance(understood, pb.UnderstandRequest)
    assert [part.image.data for part in understood.messages[0].content[:1]] == [data]
    assert [len(request.input_images) for request in generated] == [1, 1, 1, 1, 2]
    assert generated[0].input_images[0].data == data


@pytest.mark.parametrize(
    ("call", "options", "expected"),
    [
        ("generate", {"num_inference_steps": 2}, r"'num_inference_steps'; the SDK calls it 'steps'"),
        ("generate", {"guidance_scale": 4.0}, r"'guidance_scale'; the SDK calls it 'text_guidance_scale'"),
        ("generate", {"n": 2}, r"'n'; the SDK calls it 'num_images_per_prompt'"),
        ("generate", {"input_images": ["a.png"]}, r"'input_images'; the SDK calls it 'images'"),
        ("generate", {"sede": 1}, r"'sede'; the SDK calls it 'seed'"),
        ("understand", {"max_tokens": 9}, r"'max_tokens'; the SDK calls it 'max_new_tokens'"),
        ("understand", {"zzz": 9}, r"'zzz'; options: max_new_tokens, max_pixels, seed, stop"),
    ],
)
def test_an_unknown_keyword_is_a_type_error_naming_the_sdks_name(
    call: str, options: dict[str, object], expected: str
) -> None:
    """Refused before any call: no server listens on port 1."""
    with OmniGen2Client("127.0.0.1:1", retries=0) as client, pytest.raises(TypeError, match=expected):
        getattr(client, call)("x", **options)


def test_server_addresses() -> None:
    assert channel_target("127.0.0.1").address == "127.0.0.1:50051"  # gRPC's own default is 443
    assert channel_target("omnigen2.internal").address == "omnigen2.internal:50051"
    assert channel_target("[::1]").address == channel_target("::1").address == "[::1]:50051"
    assert channel_target("127.0.0.1:7").address == "127.0.0.1:7"
    assert channel_target("127.0.0.1:7,127.0.0.2").address == "ipv4:127.0.0.1:7,127.0.0.2:50051"
    assert channel_target("dns:///omnigen2-headless:50051").address == "dns:///omnigen2-headless:50051"
    assert channel_target("unix:/run/omnigen2.sock").address == "unix:/run/omnigen2.sock"
    for url, instead in [("http://127.0.0.1:8080", "127.0.0.1:8080"), ("grpc://gpu-host/", "gpu-host:50051")]:
        with pytest.raises(ValueError, match=rf"^server: '{url}' is a URL, not host:port: give e\.g\. {instead} "):
            channel_target(url)


def test_no_server_at_the_address_is_said_with_what_to_do() -> None:
    """The gRPC status stays on the exception for programs; the text names the address tried (the default port
    added) and what to do. Both clients."""
    with OmniGen2Client("127.0.0.1:1", retries=0, timeout=10) as client, pytest.raises(UnavailableError) as raised:
        client.info()
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE and raised.value.unreachable == "127.0.0.1:1"
    assert str(raised.value).startswith("UNAVAILABLE: no OmniGen2 server answered at 127.0.0.1:1 (failed to connect")
    assert "start one with `make serve`, or give the address of a running one" in str(raised.value)

    async def call() -> None:
        async with AsyncOmniGen2Client("127.0.0.1:1", retries=0, timeout=10) as client:
            await client.info()

    with pytest.raises(UnavailableError, match=r"no OmniGen2 server answered at 127\.0\.0\.1:1 "):
        asyncio.run(call())


def test_a_tls_mismatch_is_said_as_such_not_as_no_server(tmp_path: Path) -> None:
    """gRPC words a failed TLS handshake "failed to connect to all addresses" too: before, each case below said no
    server answered and to start one with `make serve`."""
    cert, key = certificate(tmp_path, "omnigen2")
    credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    with fake_server(Recorder()) as plain, fake_server(Recorder(), credentials) as secure:
        cases: list[tuple[str, bool | bytes, str, str]] = [
            (plain, cert.read_bytes(), "answered without TLS", "without --tls/--tls-ca (the SDK's tls=False)"),
            (secure, False, "took the connection and closed it", "add --tls, or --tls-ca"),
            (
                secure,
                True,
                "answered with TLS but its certificate is not trusted",
                "with --tls-ca (the SDK's tls=<PEM bytes>)",
            ),
        ]
        for address, tls, said, what_to_do in cases:
            with (
                OmniGen2Client(address, retries=0, timeout=10, tls=tls) as client,
                pytest.raises(UnavailableError) as raised,
            ):
                client.info()
            assert str(raised.value).startswith(f"UNAVAILABLE: the server at {address} {said} (failed to connect")
            assert what_to_do in str(raised.value) and "make serve" not in str(raised.value)
            assert raised.value.unreachable == ""  # the address was right
        matching = OmniGen2Client(secure, retries=0, timeout=10, tls=cert.read_bytes())
        with matching, pytest.raises(UnavailableError, match=r"^UNAVAILABLE: Triton is not ready$"):
            matching.info()  # TLS that matches reaches the stand-in


def test_a_servers_own_unavailable_keeps_its_words(served: tuple[Recorder, str]) -> None:
    with OmniGen2Client(served[1], retries=0, timeout=10) as client, pytest.raises(UnavailableError) as raised:
        client.info()
    assert (str(raised.value), raised.value.unreachable) == ("UNAVAILABLE: Triton is not ready", "")

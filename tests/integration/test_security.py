"""Security on the real stack: TLS on the API port, bearer tokens with scopes and rate limits, Triton on loopback
only, nothing taken from requests as a path or a model name, access logs without payloads."""

from __future__ import annotations

import hashlib
import io
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from omnigen2 import OmniGen2Client, ResourceExhaustedError, UnavailableError
from omnigen2.errors import OmniGen2Error
from omnigen2.v1 import omnigen2_pb2 as pb
from omnigen2.v1 import omnigen2_pb2_grpc as pb_grpc
from PIL import Image, PngImagePlugin

from serving.frontend.process import FrontendProcess
from serving.triton.install import TritonInstall
from serving.triton.launcher import TritonServer
from serving.triton.ports import LOOPBACK
from tests.certificates import certificate
from tests.integration.triton_stream import GenerationStream

FULL, LIMITED = "full-access-token", "info-only-token"


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory, triton: TritonServer) -> Iterator[tuple[FrontendProcess, bytes]]:
    """A front end with TLS and bearer tokens: FULL may do anything, LIMITED only GetModelInfo, twice in a burst."""
    work = tmp_path_factory.mktemp("secured")
    cert, key = certificate(work, "server")
    tokens = work / "tokens.json"
    tokens.write_text(
        json.dumps(
            {
                "tokens": [
                    {"name": "full", "sha256": hashlib.sha256(FULL.encode()).hexdigest(), "rate_per_minute": 600,
                     "burst": 20},
                    {"name": "limited", "sha256": hashlib.sha256(LIMITED.encode()).hexdigest(),
                     "rate_per_minute": 6, "burst": 2, "methods": ["GetModelInfo"]},
                ]
            }
        )
    )  # fmt: skip
    flags = (f"--tls-cert={cert}", f"--tls-key={key}", f"--auth-tokens={tokens}")
    with FrontendProcess(triton.grpc_url, work / "frontend.log", *flags, tls_root=cert.read_bytes()) as frontend:
        yield frontend, cert.read_bytes()


def test_tls_is_required_and_verified(secured: tuple[FrontendProcess, bytes], tmp_path: Path) -> None:
    api, ca = secured
    with OmniGen2Client(api.address, token=FULL, tls=ca, timeout=30) as client:
        assert client.info().model == "OmniGen2"
    with OmniGen2Client(api.address, token=FULL, timeout=10, retries=0) as plaintext, pytest.raises(UnavailableError):
        plaintext.info()
    stranger, _ = certificate(tmp_path, "stranger")
    wrong_ca = OmniGen2Client(api.address, token=FULL, tls=stranger.read_bytes(), timeout=10, retries=0)
    with wrong_ca, pytest.raises(UnavailableError):
        wrong_ca.info()


@pytest.mark.parametrize(
    ("token", "call", "code"),
    [
        (None, "info", grpc.StatusCode.UNAUTHENTICATED),
        ("not-a-token", "info", grpc.StatusCode.UNAUTHENTICATED),
        (LIMITED, "generate", grpc.StatusCode.PERMISSION_DENIED),
        (LIMITED, "understand", grpc.StatusCode.PERMISSION_DENIED),
    ],
)
def test_tokens_are_checked(secured: tuple[FrontendProcess, bytes], token: str | None, call: str, code: object) -> None:
    api, ca = secured
    with OmniGen2Client(api.address, token=token, tls=ca, timeout=30, retries=0) as client:
        calls = {
            "info": client.info,
            "generate": lambda: client.generate("A cat", width=32, height=32, steps=1),
            "understand": lambda: client.understand("Hi", max_new_tokens=1),
        }
        with pytest.raises(OmniGen2Error) as raised:
            calls[call]()
    assert raised.value.code == code


@pytest.mark.parametrize("scheme", ["bearer", "BEARER"])
def test_the_bearer_scheme_is_case_insensitive(secured: tuple[FrontendProcess, bytes], scheme: str) -> None:
    """RFC 7235: the scheme is a case-insensitive token (the SDK sends `Bearer`; other clients may not)."""
    api, ca = secured
    with grpc.secure_channel(api.address, grpc.ssl_channel_credentials(ca)) as channel:
        info = pb_grpc.OmniGen2Stub(channel).GetModelInfo(
            pb.GetModelInfoRequest(), metadata=[("authorization", f"{scheme} {FULL}")], timeout=10
        )
    assert info.model == "OmniGen2"


def test_full_token_generates_and_health_stays_open(secured: tuple[FrontendProcess, bytes]) -> None:
    api, ca = secured
    with OmniGen2Client(api.address, token=FULL, tls=ca, timeout=60) as client:
        assert client.generate("A cat", width=32, height=32, steps=1).images
    # No token needed for health (its probes send none). Waited for: run first, the test may find the warm-up
    # still going (NOT_SERVING), which is health answering too.
    api.wait_health(health_pb2.HealthCheckResponse.SERVING, timeout=120)


def test_rate_limit_per_token(secured: tuple[FrontendProcess, bytes]) -> None:
    api, ca = secured
    client = OmniGen2Client(api.address, token=LIMITED, tls=ca, timeout=30, retries=0)
    with client, pytest.raises(ResourceExhaustedError) as raised:
        for _ in range(3):  # a burst of 2, then one call per 10 s
            client.info()
    assert raised.value.retry_after is not None and 0 < raised.value.retry_after <= 10
    with OmniGen2Client(api.address, token=FULL, tls=ca, timeout=30) as other:
        assert other.info().model == "OmniGen2"  # another token's budget is its own


def test_triton_listens_on_loopback_only(triton: TritonServer) -> None:
    addresses = [arg for arg in triton.command(TritonInstall.find()) if "-address=" in arg]
    assert len(addresses) == 3 and all(arg.endswith(f"={LOOPBACK}") for arg in addresses)
    outside = _non_loopback_address()
    if outside is None:
        pytest.skip("this machine has no non-loopback IPv4 address to try")
    with socket.socket() as sock:
        sock.settimeout(2)
        assert sock.connect_ex((outside, triton.ports.grpc)) != 0, "Triton answered on a non-loopback address"


def _non_loopback_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("192.0.2.1", 9))  # TEST-NET: no packet is sent, the kernel picks the outgoing address
            address = sock.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else str(address)


@pytest.mark.parametrize("field", ["model", "model_name", "path", "checkpoint"])
@pytest.mark.parametrize(
    ("model", "params"),
    [("omnigen2", {"prompt": "A cat", "steps": 1}), ("mllm", {"messages": [{"role": "user", "content": []}]})],
)
def test_models_take_no_names_or_paths_from_requests(
    triton: TritonServer, field: str, model: str, params: dict[str, object]
) -> None:
    out = GenerationStream(triton.grpc_url, params | {field: "/etc/passwd"}, model=model).wait()
    assert out.error is not None and f"INVALID_ARGUMENT: {field}: unknown field" in out.error.message()


def test_access_log_has_no_payloads(api: FrontendProcess) -> None:
    marker = "SECRET-IMAGE-MARKER-8d1f"
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", marker)
    buffer = io.BytesIO()
    Image.new("RGB", (48, 48), (10, 200, 30)).save(buffer, format="PNG", pnginfo=info)
    prompt = "SECRET-PROMPT-TEXT-77c2"
    with OmniGen2Client(api.address, timeout=60) as client:
        client.edit(buffer.getvalue(), prompt, steps=1)
        client.understand(f"{prompt} about this", [buffer.getvalue()], max_new_tokens=1)
    log = api.log_path.read_text()
    assert "Generate peer=" in log and "Understand peer=" in log and f"prompt_chars={len(prompt)}" in log
    assert marker not in log and prompt not in log

"""What a web page sends to the OpenAI gateway (serving/frontend/http_origins.py), with a stand-in for the gRPC
service (no Triton): a request with an Origin header not in --http-allowed-origins, and, on a loopback address, a
Host that is not a loopback name (DNS rebinding), are refused 403 before the service is called. Before: any page a
browser showed could POST an edit (a multipart form is a CORS simple request) and have the model run it."""

from __future__ import annotations

import pytest

from serving.errors import SettingError
from serving.frontend.config import FrontendConfig
from serving.frontend.http_origins import OriginGuard
from serving.frontend.loopback import is_loopback, is_wildcard
from tests.gateways import gateway_post, multipart

EDIT, FORM = multipart(("prompt", "", b"x"), ("image", "", b"png"))


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({"Origin": "https://evil.example"}, "origin_not_allowed"),
        ({"Origin": "null"}, "origin_not_allowed"),  # a sandboxed frame or a file:// page
        ({"Host": "attacker.example"}, "host_not_allowed"),  # a name rebound to 127.0.0.1
        ({"Host": "attacker.example:8080"}, "host_not_allowed"),
        ({"Host": "127.0.0.1.nip.io"}, "host_not_allowed"),
    ],
    ids=["origin", "null-origin", "host", "host-port", "host-lookalike"],
)
@pytest.mark.parametrize("listen", ["127.0.0.1:0", "0.0.0.0:0"], ids=["loopback", "wildcard"])
def test_what_a_web_page_sends_is_refused_before_the_service(headers: dict[str, str], code: str, listen: str) -> None:
    """A wildcard address answers on 127.0.0.1 too (before: a rebound name's requests were served there)."""
    status, answer, calls = gateway_post("/v1/images/edits", EDIT, {**FORM, **headers}, listen=listen)
    assert (status, calls) == (403, 0), answer  # before: 200, the edit run
    assert (answer["error"]["type"], answer["error"]["code"]) == ("permission_error", code)


@pytest.mark.parametrize(
    ("headers", "listen"),
    [
        ({}, "127.0.0.1:0"),  # OpenAI's SDKs and curl send no Origin
        ({"Host": "localhost:8080"}, "127.0.0.1:0"),
        ({"Host": "[::1]:8080"}, "127.0.0.1:0"),
        ({"Host": "127.0.0.2"}, "127.0.0.1:0"),
        ({"Origin": "https://app.example"}, "127.0.0.1:0"),  # allowed below
        ({"Host": "app.example"}, "127.0.0.1:0"),  # an allowed origin's, from a proxy in front
        ({"Host": "app.example"}, "0.0.0.0:0"),
        ({"Host": "localhost"}, "0.0.0.0:0"),
    ],
    ids=[
        *["no-origin", "localhost", "v6-loopback", "loopback-net", "allowed-origin", "allowed-host"],
        *["wildcard-allowed-host", "wildcard-localhost"],
    ],
)
def test_callers_that_are_not_web_pages_and_allowed_origins_are_served(headers: dict[str, str], listen: str) -> None:
    config = FrontendConfig(http_allowed_origins="https://other.example, HTTPS://App.Example")
    status, answer, calls = gateway_post("/v1/images/edits", EDIT, {**FORM, **headers}, config, listen)
    assert (status, calls) == (200, 1), answer


@pytest.mark.parametrize("origins", ["app.example", "https://app.example/", "ftp://app.example", "https://a.b/path"])
def test_an_allowed_origin_that_is_no_origin_is_refused_naming_the_flag(origins: str) -> None:
    with pytest.raises(SettingError, match=r"^--http-allowed-origins: not an origin like https://app.example"):
        FrontendConfig(http_allowed_origins=origins)
    assert FrontendConfig.from_args(["--http-allowed-origins", ""]).http_allowed_origins == ""


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        *[("localhost", True), ("app.localhost", True), ("127.9.9.9", True), ("[::1]", True)],
        *[("::ffff:127.0.0.1", True), ("localhost.", True)],  # an IPv6 socket's view of 127.0.0.1
        *[("", False), ("0.0.0.0", False), ("::", False), ("10.0.0.1", False), ("localhost.example", False)],
        *[("::ffff:10.0.0.1", False)],
    ],
)
def test_loopback_names_and_addresses(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


@pytest.mark.parametrize(
    ("host", "wildcard"), [("", True), ("0.0.0.0", True), ("[::]", True), ("127.0.0.1", False), ("example", False)]
)
def test_wildcard_listen_addresses(host: str, wildcard: bool) -> None:
    assert is_wildcard(host) is wildcard


@pytest.mark.parametrize(
    ("listen", "tokens", "local", "refused"),
    [
        ("0.0.0.0", False, "127.0.0.1", True),  # a page whose name turned to 127.0.0.1
        ("[::]", False, "::1", True),
        ("", False, "::ffff:127.0.0.1", True),
        ("0.0.0.0", False, "10.0.0.5", False),  # a pod IP: a Service's or an Ingress's name
        ("0.0.0.0", True, "127.0.0.1", False),  # a rebinding page has no token
        ("127.0.0.1", True, "127.0.0.1", True),
        ("10.0.0.5", False, "10.0.0.5", False),
    ],
)
def test_the_host_is_checked_on_requests_that_reached_the_api_on_loopback(
    listen: str, tokens: bool, local: str, refused: bool
) -> None:
    guard = OriginGuard("https://app.example")
    guard.listening(listen, tokens)
    assert (guard.refusal(None, "omnigen2.default.svc:8080", local) is not None) is refused
    assert guard.refusal(None, "app.example", local) is None

"""The web UI's connection flags: a token without TLS to a server not on this machine stops the UI at start with
the SDK's reason (before: the token went in cleartext), unless --allow-plaintext-token."""

from __future__ import annotations

import grpc
import pytest
from omnigen2 import OmniGen2Client
from omnigen2.errors import OmniGen2Error
from omnigen2.webui.app import main

from tests.test_sdk_token_route import REMOTE


def test_a_token_without_tls_beyond_this_machine_stops_the_ui() -> None:
    with pytest.raises(SystemExit, match=rf"^omnigen2-webui: token: it would go in cleartext to {REMOTE}, "):
        main(["--server", REMOTE, "--token", "secret"])


def test_allow_plaintext_token_connects(monkeypatch: pytest.MonkeyPatch) -> None:
    def down(self: OmniGen2Client) -> None:
        raise OmniGen2Error(grpc.StatusCode.UNAVAILABLE, "stand-in")

    monkeypatch.setattr(OmniGen2Client, "info", down)  # the probe was made: the flag let the token through
    with pytest.raises(SystemExit, match=rf"^omnigen2-webui: no OmniGen2 API at {REMOTE} \(UNAVAILABLE: stand-in\)"):
        main(["--server", REMOTE, "--token", "secret", "--allow-plaintext-token"])

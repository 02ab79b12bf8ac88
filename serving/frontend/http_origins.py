"""Which HTTP requests may come from a web page (serving/frontend/openai_http.py, before the token check).

A multipart POST is a CORS "simple request": any page a browser shows may send one to the API (an edit that runs
the model), without being able to read the answer; and a page whose DNS name turns to 127.0.0.1 after it loaded
(DNS rebinding) is same-origin with a loopback API, and reads the answers too. Browsers mark both: every POST a page
sends carries `Origin`, and the rebinding page's requests carry its own name in `Host`. OpenAI's SDKs and curl send
no Origin, so a request with one is refused unless --http-allowed-origins names it; and an API on a loopback
address refuses a Host that is neither a loopback name or address nor an allowed origin's host (a proxy in front
may pass on its callers' Host). No CORS headers are sent: an allowed origin is one whose pages reach the API as
their own (one origin behind a proxy), not a cross-origin reader.
"""

from __future__ import annotations

import ipaddress
import re

from serving.flag_types import origin_set
from serving.frontend.openai_errors import OpenAIError, shown

FLAG = "--http-allowed-origins"
_HOST = re.compile(r"(\[[^\]]*\]|[^:]*)(:[0-9]*)?")


def is_loopback(host: str) -> bool:
    """A loopback name (localhost, *.localhost: RFC 6761) or address (127.0.0.0/8, ::1); brackets allowed."""
    name = host.strip("[]").lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class OriginGuard:
    """Refuses what a web page sent (above): `origins` the flag's value, `loopback` whether the API listens on
    loopback only."""

    def __init__(self, origins: str, loopback: bool = False) -> None:
        self.origins = origin_set(origins)
        self.loopback = loopback
        # A proxy in front of a loopback API may pass on the Host its callers named: an allowed origin's is taken.
        self.hosts = {origin.split("://", 1)[1] for origin in self.origins}

    def refusal(self, origin: str | None, host: str | None) -> OpenAIError | None:
        """The 403 for a request with these headers, or None."""
        if origin is not None and origin.strip().lower() not in self.origins:
            reason = (
                f"requests from web pages are refused: Origin {shown(origin)} is not allowed here "
                f"({FLAG} lists the origins allowed)"
            )
            return OpenAIError(403, reason, "permission_error", code="origin_not_allowed")
        if self.loopback and host is not None:
            match = _HOST.fullmatch(host.strip().lower())
            if match is None or not (is_loopback(match[1]) or match[0] in self.hosts or match[1] in self.hosts):
                reason = (
                    f"the Host header {shown(host)} is not a loopback name or address, and this API listens on "
                    "loopback only: a page whose name turned to 127.0.0.1 (DNS rebinding) is refused; "
                    f"use localhost or 127.0.0.1 (or a host of {FLAG})"
                )
                return OpenAIError(403, reason, "permission_error", code="host_not_allowed")
        return None

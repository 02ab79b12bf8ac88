"""Which HTTP requests may come from a web page (serving/frontend/openai_http.py, before the token check).

A multipart POST is a CORS "simple request": any page a browser shows may send one to the API (an edit that runs
the model), without being able to read the answer; and a page whose DNS name turns to 127.0.0.1 after it loaded
(DNS rebinding) is same-origin with a loopback API, and reads the answers too. Browsers mark both: every POST a page
sends carries `Origin`, and the rebinding page's requests carry its own name in `Host`. OpenAI's SDKs and curl send
no Origin, so a request with one is refused unless --http-allowed-origins names it; and a request that reached
the API on a loopback address refuses a Host that is neither a loopback name or address nor an allowed origin's
host (a proxy in front may pass on its callers' Host). That holds for an API on a loopback address, and on a
wildcard one (0.0.0.0, [::]: it answers on loopback too) unless --auth-tokens is set (a rebinding page has no
token); a request that reached a wildcard API on another address (a pod IP behind a Service or an Ingress, with
the name it was called by) is not checked. No CORS headers are sent: an allowed origin is one whose pages reach the
API as their own (one origin behind a proxy), not a cross-origin reader.
"""

from __future__ import annotations

import re

from serving.flag_types import origin_set
from serving.frontend.loopback import is_loopback, is_wildcard
from serving.frontend.openai_errors import OpenAIError, shown

FLAG = "--http-allowed-origins"
_HOST = re.compile(r"(\[[^\]]*\]|[^:]*)(:[0-9]*)?")


class OriginGuard:
    """Refuses what a web page sent (above): `origins` the flag's value."""

    def __init__(self, origins: str) -> None:
        self.origins = origin_set(origins)
        self.checks_host = True  # whether a request that reached the API on loopback has its Host checked
        # A proxy in front of a loopback API may pass on the Host its callers named: an allowed origin's is taken.
        self.hosts = {origin.split("://", 1)[1] for origin in self.origins}

    def listening(self, listen_host: str, tokens: bool) -> None:
        """The API listens on `listen_host`, with --auth-tokens or not: on a wildcard address with tokens, a Host
        is taken as it is (above)."""
        self.checks_host = not (is_wildcard(listen_host) and tokens)

    def refusal(self, origin: str | None, host: str | None, local: str | None = None) -> OpenAIError | None:
        """The 403 for a request with these headers that reached the API on the `local` address, or None."""
        if origin is not None and origin.strip().lower() not in self.origins:
            reason = (
                f"requests from web pages are refused: Origin {shown(origin)} is not allowed here "
                f"({FLAG} lists the origins allowed)"
            )
            return OpenAIError(403, reason, "permission_error", code="origin_not_allowed")
        if self.checks_host and host is not None and local is not None and is_loopback(local):
            match = _HOST.fullmatch(host.strip().lower())
            if match is None or not (is_loopback(match[1]) or match[0] in self.hosts or match[1] in self.hosts):
                reason = (
                    f"the Host header {shown(host)} is not a loopback name or address, and the request reached "
                    "this API on loopback: a page whose name turned to 127.0.0.1 (DNS rebinding) is refused; "
                    f"use localhost or 127.0.0.1 (or a host of {FLAG})"
                )
                return OpenAIError(403, reason, "permission_error", code="host_not_allowed")
        return None

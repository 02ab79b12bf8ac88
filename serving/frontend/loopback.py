"""Which listen or Host names are this machine's loopback, and which listen addresses are every address: the one
check the front end's warnings (serving/frontend/server.py) and the HTTP API's Host check
(serving/frontend/http_origins.py) share."""

from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    """A loopback name (localhost, *.localhost: RFC 6761) or address (127.0.0.0/8, ::1, and 127.x as an IPv6
    socket sees it: ::ffff:127.0.0.1); brackets allowed."""
    name = host.strip("[]").lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return (mapped or address).is_loopback


def is_wildcard(host: str) -> bool:
    """A listen host that is every address of this machine, its loopback included: "", 0.0.0.0 or [::]."""
    name = host.strip("[]")
    try:
        return not name or ipaddress.ip_address(name).is_unspecified
    except ValueError:
        return False

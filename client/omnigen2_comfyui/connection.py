"""The nodes' client: the server named on the node, its token from the node or else from the environment, and no
token sent in cleartext beyond this machine unless the node says so.

A token typed into the node is a widget value: ComfyUI saves it in the workflow, and its SaveImage node writes the
workflow into every PNG it saves, so sharing an output image shares the token. OMNIGEN2_TOKEN (the CLI's variable)
keeps it out of both.
"""

from __future__ import annotations

import ipaddress
import os

from omnigen2 import OmniGen2Client
from omnigen2.client import channel_target

TOKEN_ENV = "OMNIGEN2_TOKEN"
TIMEOUT_S = 3600.0  # a full-size generation on a slow machine takes minutes
_LOCAL_SCHEMES = ("unix:", "unix-abstract:")  # gRPC targets that cannot leave this machine
_RESOLVER_SCHEMES = ("dns:", "ipv4:", "ipv6:")


def open_client(server: str, token: str, tls: bool, allow_plaintext_token: bool) -> OmniGen2Client:
    """A client to `server`; `token` empty: $OMNIGEN2_TOKEN. A token without TLS to a server that is not on this
    machine is refused (ValueError, shown as the node's error) unless `allow_plaintext_token`."""
    token = token or os.environ.get(TOKEN_ENV, "")
    if token and not tls and not allow_plaintext_token and not on_this_machine(server):
        raise ValueError(
            f"token: it would go in cleartext to {server}, readable on the way: turn `tls` on (a server started with "
            "--tls-cert), or `allow_plaintext_token` on a network you trust"
        )
    return OmniGen2Client(server, timeout=TIMEOUT_S, token=token or None, tls=tls)


def on_this_machine(server: str) -> bool:
    """Whether every endpoint of `server` (as the SDK takes it: host:port, lists, gRPC target URIs) is loopback or a
    Unix socket. A host name other than localhost counts as remote: it is not resolved here."""
    return all(_local(endpoint) for endpoint in channel_target(server).shown.split(", "))


def _local(endpoint: str) -> bool:
    if endpoint.startswith(_LOCAL_SCHEMES):
        return True
    if endpoint.startswith(_RESOLVER_SCHEMES):  # dns:///host:port, dns://resolver/host:port, ipv4:host:port
        endpoint = endpoint.split(":", 1)[1].rsplit("/", 1)[-1]
    host = endpoint.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

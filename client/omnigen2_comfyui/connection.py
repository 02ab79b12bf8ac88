"""The nodes' client: the server named on the node, its token from the node or else from the environment, and no
token sent in cleartext beyond this machine unless the node says so.

A token typed into the node is a widget value: ComfyUI saves it in the workflow, and its SaveImage node writes the
workflow into every PNG it saves, so sharing an output image shares the token. OMNIGEN2_TOKEN (the CLI's variable)
keeps it out of both.
"""

from __future__ import annotations

import os

from omnigen2 import OmniGen2Client

TOKEN_ENV = "OMNIGEN2_TOKEN"
TIMEOUT_S = 3600.0  # a full-size generation on a slow machine takes minutes


def open_client(server: str, token: str, tls: bool, allow_plaintext_token: bool) -> OmniGen2Client:
    """A client to `server`; `token` empty: $OMNIGEN2_TOKEN. A token without TLS to a server that is not on this
    machine is refused by the SDK (ValueError naming `tls` and `allow_plaintext_token`, shown as the node's error)
    unless `allow_plaintext_token`."""
    token = token or os.environ.get(TOKEN_ENV, "")
    return OmniGen2Client(
        server, timeout=TIMEOUT_S, token=token or None, tls=tls, allow_plaintext_token=allow_plaintext_token
    )

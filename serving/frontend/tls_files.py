"""--tls-cert and --tls-key: read and checked at start, each fault named by its flag (before, a lone flag read a
folder, a missing file was a traceback, and swapped files failed the bind as if the port were in use)."""

from __future__ import annotations

import ssl
from pathlib import Path

from serving.errors import SettingError

CERTIFICATE = b"-----BEGIN CERTIFICATE-----"
PRIVATE_KEY = (b"-----BEGIN PRIVATE KEY-----", b"-----BEGIN RSA PRIVATE KEY-----", b"-----BEGIN EC PRIVATE KEY-----")


def read_tls(cert: str, key: str) -> tuple[bytes, bytes] | None:
    """(certificate chain, private key) as PEM, or None when TLS is off (neither flag)."""
    if not cert and not key:
        return None
    if not key:
        raise SettingError("--tls-key", f"is needed with --tls-cert ({cert})")
    if not cert:
        raise SettingError("--tls-cert", f"is needed with --tls-key ({key})")
    chain, secret = _read("--tls-cert", cert), _read("--tls-key", key)
    if CERTIFICATE not in chain:
        raise SettingError("--tls-cert", f"not a PEM certificate ({cert})")
    if not any(marker in secret for marker in PRIVATE_KEY):
        raise SettingError("--tls-key", f"not a PEM private key ({key})")
    # OpenSSL parses both and checks that the key is the certificate's, as gRPC's would at the bind.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_verify_locations(cadata=chain.decode("ascii", "replace"))
    except (ssl.SSLError, ValueError) as exc:
        raise SettingError("--tls-cert", f"not a valid PEM certificate: {exc} ({cert})") from None
    try:
        context.load_cert_chain(cert, key, password=lambda: b"")
    except (ssl.SSLError, ValueError) as exc:  # an encrypted key, a broken one, or another certificate's
        raise SettingError("--tls-key", f"not the private key of --tls-cert, or unreadable: {exc} ({key})") from None
    return chain, secret


def _read(flag: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SettingError(flag, f"cannot read it: {exc.strerror} ({path})") from None

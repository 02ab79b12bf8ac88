"""Connections that never start their TLS handshake, on the gRPC port and the HTTPS port: closed at
--tls-handshake-timeout-s (gRPC's default waited 120 s, asyncio's 60 s; on the HTTPS port such connections are not yet
counted among --http-max-connections, so 230 a second held 14 685 of the front end's 20 000 files). A front end in
process, no Triton."""

from __future__ import annotations

import asyncio
from pathlib import Path

from serving.triton.ports import free_port
from tests.certificates import certificate
from tests.frontends import in_process_frontend

TIMEOUT_S = 0.5
WAIT_S = 5.0  # far past the flag, far below the defaults


async def _closed_by_server(port: int) -> bool:
    """Whether a connection to `port` that sends nothing is closed by the server within WAIT_S."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        return await asyncio.wait_for(reader.read(1), WAIT_S) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    finally:
        writer.close()


def test_silent_tls_connections_are_closed_at_the_handshake_timeout(tmp_path: Path) -> None:
    cert, key = certificate(tmp_path, "localhost")
    http_port = free_port()

    async def run() -> list[bool]:
        changes = {"tls_cert": str(cert), "tls_key": str(key), "tls_handshake_timeout_s": TIMEOUT_S}
        async with in_process_frontend(**changes, http_listen=f"127.0.0.1:{http_port}") as (frontend, _):
            return list(await asyncio.gather(_closed_by_server(frontend.port), _closed_by_server(http_port)))

    assert asyncio.run(run()) == [True, True]  # the gRPC port's, the HTTPS port's

"""A `tritonserver` that a dead stack left on the Triton ports (from before it had a parent-death signal) is killed
by the next start on those ports; a live stack's is not. The stand-in server is a script named `tritonserver` that
listens on the gRPC port with the region prefix of those ports in its arguments."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from serving.errors import SettingError
from serving.triton.launcher import Ports, free_port, port_in_use
from serving.triton.leftovers import region_prefix

SERVER = """#!{python}
import socket, sys, time
listener = socket.socket()
listener.bind(("127.0.0.1", int(sys.argv[1].partition("=")[2])))
listener.listen()
time.sleep(60)
"""


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _server(tmp_path: Path, ports: Ports) -> list[str]:
    server = tmp_path / "tritonserver"
    server.write_text(SERVER.format(python=sys.executable))
    server.chmod(0o755)
    prefix = region_prefix(ports.grpc)
    return [str(server), f"--grpc-port={ports.grpc}", f"--backend-config=python,shm-region-prefix-name={prefix}"]


def _listening(ports: Ports) -> None:
    deadline = time.monotonic() + 10
    while not port_in_use(ports.grpc):
        assert time.monotonic() < deadline, "the stand-in server did not listen"
        time.sleep(0.05)


def test_a_server_whose_launcher_died_is_killed_and_its_ports_taken(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ports = Ports(free_port(), free_port(), free_port())
    # Its launcher exits at once, leaving it to init (or a subreaper), as a killed stack did.
    started = subprocess.run(
        ["sh", "-c", '"$@" >/dev/null 2>&1 & echo $!', "sh", *_server(tmp_path, ports)], capture_output=True
    )
    orphan = int(started.stdout)
    try:
        _listening(ports)
        with caplog.at_level(logging.WARNING):
            ports.check_free()
        assert not _alive(orphan) and not port_in_use(ports.grpc)
        assert f"killed tritonserver {orphan}" in caplog.text
    finally:
        if _alive(orphan):
            psutil.Process(orphan).kill()


def test_a_live_stacks_server_is_left_alone(tmp_path: Path) -> None:
    ports = Ports(free_port(), free_port(), free_port())
    server = subprocess.Popen(_server(tmp_path, ports))  # launched by this Python process, which lives
    try:
        _listening(ports)
        with pytest.raises(SettingError, match=f"{ports.grpc} on 127.0.0.1 in use"):
            ports.check_free()
        assert server.poll() is None
    finally:
        server.kill()
        server.wait()

"""A `tritonserver` that a dead stack left on the Triton ports (from before it had a parent-death signal) is killed
by the next start on those ports, whoever took it over; a live launcher's and another user's are not. The stand-in
server is a script named `tritonserver` that listens on the gRPC port with the region prefix of those ports in its
arguments."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from serving.errors import SettingError
from serving.triton.leftovers import LAUNCHER_ENV, region_prefix
from serving.triton.ports import Ports, free_port, port_in_use
from tests.processes import alive

SERVER = """#!{python}
import socket, sys, time
listener = socket.socket()
listener.bind(("127.0.0.1", int(sys.argv[1].partition("=")[2])))
listener.listen()
time.sleep(60)
"""
# A Python subreaper (as a Python init or supervisor is) whose child, sh, names itself in the server's environment
# as its launcher, starts it and exits: the server is left to the subreaper.
REAPER = """import ctypes, subprocess, sys, time
ctypes.CDLL(None).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER
launch = '{env}=$$ "$@" >/dev/null 2>&1 & echo $!'
subprocess.run(["sh", "-c", launch, "sh", *sys.argv[1:]])
time.sleep(60)
"""


def _server(tmp_path: Path, ports: Ports) -> list[str]:
    server = tmp_path / "tritonserver"
    server.write_text(SERVER.format(python=sys.executable))
    server.chmod(0o755)
    prefix = region_prefix(ports.grpc)
    return [str(server), f"--grpc-port={ports.grpc}", f"--backend-config=python,shm-region-prefix-name={prefix}"]


def _orphan(tmp_path: Path, ports: Ports) -> int:
    """A server whose launcher, sh, exits at once, leaving it to init (or a subreaper), as a killed stack did."""
    started = subprocess.run(
        ["sh", "-c", '"$@" >/dev/null 2>&1 & echo $!', "sh", *_server(tmp_path, ports)], capture_output=True
    )
    return int(started.stdout)


def _listening(ports: Ports) -> None:
    deadline = time.monotonic() + 10
    while not port_in_use(ports.grpc):
        assert time.monotonic() < deadline, "the stand-in server did not listen"
        time.sleep(0.05)


def test_a_server_whose_launcher_died_is_killed_and_its_ports_taken(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ports = Ports(free_port(), free_port(), free_port())
    orphan = _orphan(tmp_path, ports)
    try:
        _listening(ports)
        with caplog.at_level(logging.WARNING):
            ports.check_free()
        assert not alive(orphan) and not port_in_use(ports.grpc)
        assert f"killed tritonserver {orphan}" in caplog.text
    finally:
        if alive(orphan):
            psutil.Process(orphan).kill()


def test_a_server_left_to_a_python_subreaper_is_killed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Before, any parent running Python was taken for its launcher: a Python init's or supervisor's orphan was kept.
    ports = Ports(free_port(), free_port(), free_port())
    reaper = subprocess.Popen(
        [sys.executable, "-c", REAPER.format(env=LAUNCHER_ENV), *_server(tmp_path, ports)], stdout=subprocess.PIPE
    )
    assert reaper.stdout is not None
    orphan = int(reaper.stdout.readline())
    try:
        _listening(ports)
        assert psutil.Process(orphan).ppid() == reaper.pid
        with caplog.at_level(logging.WARNING):
            ports.check_free()
        assert not alive(orphan) and not port_in_use(ports.grpc)
        assert f"killed tritonserver {orphan}" in caplog.text and f"pid {reaper.pid} took it over" in caplog.text
    finally:
        if alive(orphan):
            psutil.Process(orphan).kill()
        reaper.kill()
        reaper.wait()


@pytest.mark.parametrize("named", [True, False], ids=["names-its-launcher", "from-before-the-name"])
def test_a_live_launchers_server_is_left_alone(tmp_path: Path, caplog: pytest.LogCaptureFixture, named: bool) -> None:
    ports = Ports(free_port(), free_port(), free_port())
    env = {**os.environ, LAUNCHER_ENV: str(os.getpid())} if named else None
    server = subprocess.Popen(_server(tmp_path, ports), env=env)  # launched by this Python process, which lives
    try:
        _listening(ports)
        with caplog.at_level(logging.INFO), pytest.raises(SettingError, match=f"{ports.grpc} on 127.0.0.1 in use"):
            ports.check_free()
        assert server.poll() is None
        assert f"tritonserver {server.pid} (region prefix {region_prefix(ports.grpc)}) holds" in caplog.text
    finally:
        server.kill()
        server.wait()


def test_another_users_server_is_left_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its launcher cannot be told from here; before, its kill failed and the log said its launcher had died.
    ports = Ports(free_port(), free_port(), free_port())
    orphan = _orphan(tmp_path, ports)
    user = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: user + 1)  # this test's processes are then another user's
    try:
        _listening(ports)
        with caplog.at_level(logging.WARNING), pytest.raises(SettingError, match="in use"):
            ports.check_free()
        assert alive(orphan)
        assert f"tritonserver {orphan} (region prefix {region_prefix(ports.grpc)}) is user {user}'s" in caplog.text
    finally:
        if alive(orphan):
            psutil.Process(orphan).kill()

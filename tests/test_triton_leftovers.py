"""Clean-up after a dead `tritonserver` ends only what it left: stand-ins for stubs (a `model.py` mapping its
region, as a Python-backend stub does) and for a live server of another stack (a process named `tritonserver`)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from serving.triton.leftovers import SHM, clean_up, mapped_regions
from serving.triton.watchdog import proc_stat
from tests.processes import alive

STUB = """import mmap, os, sys, time
fd = os.open(f"/dev/shm/{sys.argv[1]}", os.O_RDWR | os.O_CREAT, 0o600)
os.ftruncate(fd, 4096)
region = mmap.mmap(fd, 4096)
time.sleep(60)
"""


@pytest.fixture
def prefix() -> Iterator[str]:
    prefix = f"omnigen2_triton_test_{os.getpid()}_"
    yield prefix
    for region in SHM.glob(f"{prefix}*"):
        region.unlink()


def test_only_a_dead_servers_stubs_and_regions_are_removed(tmp_path: Path, prefix: str) -> None:
    model = tmp_path / "model" / "1" / "model.py"
    model.parent.mkdir(parents=True)
    model.write_text(STUB)
    server = tmp_path / "tritonserver"  # a live server of another stack, its stub started as its child
    server.write_text('#!/bin/sh\n"$@" &\nwait\n')
    server.chmod(0o755)
    live, orphan, unmapped = f"{prefix}live", f"{prefix}orphan", f"{prefix}unmapped"
    other = subprocess.Popen([server, sys.executable, model, live], start_new_session=True)
    # A stub whose server is gone: its parent exits at once, leaving it to init.
    subprocess.run(["sh", "-c", f'"$0" "$1" "$2" & echo $! > {tmp_path / "orphan.pid"}', sys.executable, model, orphan])
    (SHM / unmapped).write_bytes(b"")  # a region whose stub and server are both gone
    try:
        deadline = time.monotonic() + 10
        while not {live, orphan} <= mapped_regions():
            assert time.monotonic() < deadline, "the stand-in stubs did not map their regions"
            time.sleep(0.05)
        (live_stub,) = psutil.Process(other.pid).children()
        orphan_stub = int((tmp_path / "orphan.pid").read_text())
        clean_up(prefix)
        deadline = time.monotonic() + 5
        while alive(orphan_stub):
            assert time.monotonic() < deadline, "the orphaned stub was not killed"
            time.sleep(0.05)
        assert alive(live_stub.pid) and other.poll() is None, "another server's stub was killed"
        assert (SHM / live).exists(), "a region in use was removed"
        assert not (SHM / orphan).exists() and not (SHM / unmapped).exists()
    finally:
        for process in psutil.Process(other.pid).children():
            process.kill()
        other.kill()
        other.wait()


def test_a_command_name_holding_spaces_and_parentheses_is_read_whole() -> None:
    """Read up to its first ')', this name gave state Z and parent 1."""
    name = "x) Z 1 (y"
    code = f"open('/proc/self/comm', 'w').write({name!r}); print(flush=True); import time; time.sleep(60)"
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert process.stdout is not None and process.stdout.readline()  # the name is set
        stat = proc_stat(process.pid)
        assert (stat.name, stat.parent) == (name, os.getpid()) and stat.state in ("R", "S")
    finally:
        process.kill()
        process.wait()


def test_an_orphaned_stub_of_this_repository_is_removed_whatever_its_ports(tmp_path: Path, prefix: str) -> None:
    """A stack stopped while Triton loaded left the stub loading its model; restarted on other ports (another region
    prefix), the clean-up did not find it (before: it lived on, holding its region)."""
    repository = tmp_path / "repository"
    model = repository / "vae_decoder" / "1" / "model.py"
    model.parent.mkdir(parents=True)
    model.write_text(STUB)
    elsewhere = tmp_path / "other-repository" / "m" / "1" / "model.py"  # another repository's orphan: left alone
    elsewhere.parent.mkdir(parents=True)
    elsewhere.write_text(STUB)
    old, other = f"{prefix}old_ports", f"{prefix}other_repository"
    pids = []
    for stub, region in ((model, old), (elsewhere, other)):
        started = subprocess.run(
            ["sh", "-c", '"$@" >/dev/null 2>&1 & echo $!', "sh", sys.executable, stub, region], capture_output=True
        )
        pids.append(int(started.stdout))
    orphan, kept = pids
    try:
        deadline = time.monotonic() + 10
        while not {old, other} <= mapped_regions():
            assert time.monotonic() < deadline, "the stand-in stubs did not map their regions"
            time.sleep(0.05)
        clean_up(f"{prefix}new_ports_", repository)
        deadline = time.monotonic() + 5
        while alive(orphan):
            assert time.monotonic() < deadline, "the orphaned stub of this repository was not killed"
            time.sleep(0.05)
        assert not (SHM / old).exists(), "its region was left"
        assert alive(kept) and (SHM / other).exists(), "another repository's stub was killed"
    finally:
        for pid in pids:
            if alive(pid):
                psutil.Process(pid).kill()

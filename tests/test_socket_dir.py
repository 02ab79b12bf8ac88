"""serving/frontend/socket_dir.py: a new front end removes the socket folders of front ends that died, only those."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from serving.frontend import socket_dir
from serving.triton.leftovers import pid_namespace


def test_the_folders_of_dead_front_ends_are_removed_and_no_other(tmp_path: Path) -> None:
    ended = subprocess.Popen(["true"])
    ended.wait()
    namespace = pid_namespace()
    dead = tmp_path / f"{socket_dir.PREFIX}{namespace}-{ended.pid}-abc"
    (dead / "grpc.sock").mkdir(parents=True)  # what a killed front end left
    live = tmp_path / f"{socket_dir.PREFIX}{namespace}-{os.getpid()}-def"
    live.mkdir()
    other_namespace = tmp_path / f"{socket_dir.PREFIX}{namespace + 1}-{ended.pid}-ghi"
    other_namespace.mkdir()
    not_a_folder = tmp_path / f"{socket_dir.PREFIX}{namespace}-{ended.pid}-jkl"
    not_a_folder.write_text("")
    created = socket_dir.create(tmp_path)
    assert not dead.exists()
    assert live.is_dir() and other_namespace.is_dir() and not_a_folder.is_file()
    assert created.is_dir() and created.name.startswith(f"{socket_dir.PREFIX}{namespace}-{os.getpid()}-")
    assert created.stat().st_mode & 0o777 == 0o700  # only this user can reach the socket
    assert socket_dir.remove_orphans(tmp_path) == []  # its own is alive

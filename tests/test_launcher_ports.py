"""The launcher refuses Triton ports another server listens on: that server would answer the readiness checks
and the stack would run on it (a second `make serve` on the first one's Triton) while its own tritonserver fails."""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path

import pytest

from serving import stack
from serving.errors import SettingError
from serving.triton.launcher import LOOPBACK, Ports, TritonServer, free_port, port_in_use


def test_triton_ports_in_use_are_refused_before_anything_starts(tmp_path: Path) -> None:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as other:
        other.bind((LOOPBACK, 0))
        other.listen()
        taken = other.getsockname()[1]
        server = TritonServer(tmp_path / "repository", Ports(free_port(), taken, free_port()), build_dir=tmp_path)
        with pytest.raises(SettingError, match=f"{taken} on {LOOPBACK} in use") as refused:
            server.start()
    assert refused.value.setting == "--triton-ports"
    assert server.process is None  # no tritonserver was started
    assert not port_in_use(taken)  # free again once the other server has gone


def test_the_stack_refuses_them_before_building_its_repository(tmp_path: Path) -> None:
    """`make serve` checks its Triton ports first: the repository build before Triton starts can take minutes."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as other:
        other.bind((LOOPBACK, 0))
        other.listen()
        taken = other.getsockname()[1]
        ports = [str(free_port()), str(free_port()), str(taken)]
        repository = tmp_path / "repository"
        argv = ["--checkpoint", str(tmp_path / "absent"), "--model-repository", str(repository), "--triton-ports"]
        with pytest.raises(SettingError, match=f"{taken} on {LOOPBACK} in use"):
            stack.main([*argv, *ports])
    assert not repository.exists()

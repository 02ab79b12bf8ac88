"""The launcher refuses Triton ports another server listens on: that server would answer the readiness checks
and the stack would run on it (a second `make serve` on the first one's Triton) while its own tritonserver fails."""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path

import pytest

from serving import stack
from serving.errors import SettingError
from serving.triton.launcher import TritonServer
from serving.triton.ports import LOOPBACK, Ports, free_port, port_in_use


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
        argv = ["--checkpoint", str(tmp_path / "absent"), "--model-repository", str(repository), *_front_end_ports()]
        with pytest.raises(SettingError, match=f"{taken} on {LOOPBACK} in use"):
            stack.main([*argv, "--triton-ports", *ports])
    assert not repository.exists()


@pytest.mark.parametrize("flag", ["--listen", "--http-listen", "--metrics-port"])
def test_the_stack_refuses_a_taken_front_end_port_before_building_too(tmp_path: Path, flag: str) -> None:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as other:
        other.bind(("0.0.0.0", 0))  # a server on every address holds the port on loopback too
        other.listen()
        taken = other.getsockname()[1]
        value = str(taken) if flag == "--metrics-port" else f"127.0.0.1:{taken}"
        repository = tmp_path / "repository"
        triton = [str(free_port()) for _ in range(3)]
        argv = ["--checkpoint", str(tmp_path / "absent"), "--model-repository", str(repository)]
        argv += [*_front_end_ports(), flag, value]  # the last of a flag given twice wins
        with pytest.raises(SettingError, match=f"127.0.0.1:{taken}: the port is in use") as refused:
            stack.main([*argv, "--triton-ports", *triton])
    assert refused.value.setting == flag and not repository.exists()


def _front_end_ports() -> list[str]:
    """Free ports for every front-end flag: their defaults (8080 for HTTP) may be held on a developer's machine."""
    return ["--listen", f"{LOOPBACK}:{free_port()}", "--http-listen", f"{LOOPBACK}:{free_port()}",
            "--metrics-port", str(free_port())]  # fmt: skip


def test_addresses_that_are_not_this_machines_are_left_to_the_servers_own_bind() -> None:
    assert not port_in_use(free_port(), "192.0.2.1")  # TEST-NET-1: not bound here, but not in use either

"""Settings `python -m serving.stack` refuses at start in one line, before a build or a Triton start: its own ports
given twice, a folder it cannot write (read-only, full: the OSError is injected where the build writes, as the
tests run as root), a Triton install that is not one. And its Triton logs: one per server, a bounded number kept."""

from __future__ import annotations

import errno
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from serving import stack
from serving.errors import SettingError
from serving.frontend.config import FrontendConfig
from serving.triton.launcher import KEPT_LOGS, TritonServer, prune_logs
from serving.triton.ports import Ports, free_port


@pytest.fixture(autouse=True)
def _signal_handlers() -> Iterator[None]:
    """main() sets its own SIGTERM and SIGINT handlers: the test process gets its own back."""
    kept = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    yield
    for signum, handler in kept.items():
        signal.signal(signum, handler)


def _triton_ports(*ports: int) -> list[str]:
    return ["--triton-ports", *map(str, ports)]


@pytest.mark.parametrize(
    "case",
    ["listen-http-listen", "listen-triton", "triton-thrice", "metrics-triton"],
)
def test_the_stacks_own_ports_given_twice_are_refused_naming_both_flags(case: str) -> None:
    # Before: the first failed after Triton was up, the second after its models loaded, the third with Triton's
    # usage text in a RuntimeError traceback.
    a, b, c, d = (free_port() for _ in range(4))
    argv, message = {
        "listen-http-listen": (
            [f"--listen=127.0.0.1:{a}", f"--http-listen=127.0.0.1:{a}", *_triton_ports(b, c, d)],
            f"--http-listen: port {a} is also --listen's",
        ),
        "listen-triton": (
            [f"--listen=127.0.0.1:{a}", f"--http-listen=127.0.0.1:{b}", *_triton_ports(c, a, d)],
            f"--triton-ports GRPC: port {a} is also --listen's",
        ),
        "triton-thrice": (
            [f"--listen=127.0.0.1:{a}", f"--http-listen=127.0.0.1:{b}", *_triton_ports(c, c, c)],
            f"--triton-ports GRPC: port {c} is also --triton-ports HTTP's",
        ),
        "metrics-triton": (
            [f"--listen=0.0.0.0:{a}", "--http-listen=", f"--metrics-port={b}", *_triton_ports(b, c, d)],
            f"--triton-ports HTTP: port {b} is also --metrics-port's",
        ),
    }[case]
    with pytest.raises(SettingError, match=message):
        stack.main(argv)


@pytest.mark.parametrize("flag", ["--listen", "--http-listen"])
def test_an_address_not_this_machines_is_refused_before_the_build(flag: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: taken, and the front end's bind refused it once the repository was built and Triton had loaded it.
    monkeypatch.setattr(stack, "prepare_repository", lambda *_, **__: pytest.fail("built before the refusal"))
    a, b, c, d, e = (free_port() for _ in range(5))
    addresses = {"--listen": f"127.0.0.1:{a}", "--http-listen": f"127.0.0.1:{b}", flag: f"192.0.2.1:{e}"}  # TEST-NET-1
    argv = [f"{name}={address}" for name, address in addresses.items()]
    with pytest.raises(SettingError, match=rf"^{flag}: cannot listen on 192\.0\.2\.1:{e}: \S"):
        stack.main([*argv, "--metrics-port=0", *_triton_ports(c, d, free_port())])


def test_ports_on_other_addresses_are_not_refused() -> None:
    port = free_port()
    config = FrontendConfig(listen=f"127.0.0.2:{port}", http_listen="")
    stack.refuse_shared_ports(config, Ports(port, free_port(), free_port()))


@pytest.mark.parametrize(
    ("error", "named", "message"),
    [
        (errno.EROFS, "build/onnx/x.onnx", "--build-dir: {build}: read-only file system"),
        (errno.EROFS, "repository/mllm", "--model-repository: {repository}: read-only file system"),
        (errno.ENOSPC, None, "--build-dir or --model-repository: {build} or {repository}: no space left on device"),
    ],
    ids=["read-only-build-dir", "read-only-repository", "full-disk-unnamed"],
)
def test_a_folder_that_cannot_be_written_is_named_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: int, named: str | None, message: str
) -> None:
    # Before: a 15-line OSError traceback.
    build, repository = tmp_path / "build", tmp_path / "repository"

    def build_fails(*args: object, **kwargs: object) -> None:
        raise OSError(error, os.strerror(error), None if named is None else str(tmp_path / named))

    monkeypatch.setattr(stack, "prepare_repository", build_fails)
    argv = [
        f"--build-dir={build}",
        f"--model-repository={repository}",
        "--listen=127.0.0.1:0",
        "--http-listen=",
        "--metrics-port=0",
    ]
    with pytest.raises(SettingError) as refused:
        stack.main([*argv, *_triton_ports(free_port(), free_port(), free_port())])
    assert str(refused.value) == message.format(build=build, repository=repository)


def test_another_folders_write_error_keeps_its_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def build_fails(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EACCES, os.strerror(errno.EACCES), "/elsewhere/file")

    monkeypatch.setattr(stack, "prepare_repository", build_fails)
    argv = [f"--build-dir={tmp_path}", "--listen=127.0.0.1:0", "--http-listen=", "--metrics-port=0"]
    with pytest.raises(PermissionError):
        stack.main([*argv, *_triton_ports(free_port(), free_port(), free_port())])


def test_a_triton_install_that_is_not_one_is_named_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: a FileNotFoundError traceback.
    monkeypatch.setenv("OMNIGEN2_TRITONSERVER", "/nowhere")
    with pytest.raises(SettingError, match=r"^OMNIGEN2_TRITONSERVER: /nowhere/bin/tritonserver: not found"):
        stack.main([])


def test_each_server_has_a_log_of_its_own(tmp_path: Path) -> None:
    # Before: every server on a build folder wrote build/tritonserver.log.
    first = TritonServer(tmp_path, Ports(8100, 8101, 8102), build_dir=tmp_path / "build")
    second = TritonServer(tmp_path, Ports(8200, 8201, 8202), build_dir=tmp_path / "build")
    assert first.log_path == tmp_path / "build" / "tritonserver-8101.log"
    assert second.log_path == tmp_path / "build" / "tritonserver-8201.log"


def test_only_the_newest_logs_are_kept(tmp_path: Path) -> None:
    logs = [tmp_path / f"tritonserver-{port}.log" for port in range(9000, 9000 + KEPT_LOGS + 3)]
    for age, log in enumerate(logs):
        log.write_text("")
        os.utime(log, (1_000_000 - age, 1_000_000 - age))  # logs[0] the newest
    current = tmp_path / "tritonserver-8001.log"
    current.write_text("")
    os.utime(current, (1, 1))  # the oldest, but this server's
    prune_logs(tmp_path, keep=current)
    assert sorted(tmp_path.iterdir()) == sorted([current, *logs[:KEPT_LOGS]])


def test_a_live_servers_log_is_kept_however_old(tmp_path: Path) -> None:
    # Before: only the 8 newest by mtime were kept, so an idle live server's log (and its .1) of another stack sharing
    # the build folder was deleted.
    with socket.create_server(("127.0.0.1", 0)) as live:
        port = live.getsockname()[1]
        kept = [tmp_path / f"tritonserver-{port}.log", tmp_path / f"tritonserver-{port}.log.1"]
        newer = [tmp_path / f"tritonserver-{free_port()}.log" for _ in range(KEPT_LOGS + 2)]
        for log in [*kept, *newer]:
            log.write_text("")
        for log in kept:
            os.utime(log, (1, 1))  # the oldest of all
        current = tmp_path / "tritonserver-8001.log"
        current.write_text("")
        prune_logs(tmp_path, keep=current)
        assert all(log.exists() for log in kept)
        assert sum(log.exists() for log in newer) == KEPT_LOGS

"""`python -m serving.stack` stopped by SIGTERM or SIGINT before it serves: while Triton loads its models (a real
tritonserver on the golden tiny repository) and while the repository is built (a stand-in build that signals its own
process). Each exits 0 with one line naming what it interrupted, and leaves no tritonserver, stub or region."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from serving.triton.leftovers import SHM, region_prefix
from serving.triton.ports import Ports
from serving.triton.watchdog import processes, stubs_of_repository
from tests.processes import alive

ROOT = Path(__file__).resolve().parents[1]
# A repository build that gets SIGTERM, as a stop during an ONNX export does, and waits to be interrupted.
INTERRUPTED_BUILD = """import os, signal, sys, time
import serving.stack
def build(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)
serving.stack.prepare_repository = build  # kept by main's late imports
serving.stack.main(sys.argv[1:])
"""

# torch's import (6-9 s) stopped: the stand-in signals its own process instead of importing.
INTERRUPTED_IMPORT = """import os, signal, sys, time
import serving.stack
def imports():
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)
serving.stack._import_late = imports
serving.stack.main(sys.argv[1:])
"""

# `python -m serving.stack` signalled while it imports its modules, before main: as soon after its start as is sure
# to be after the interpreter's own (`serving.frontend.config` is one of the stack's first imports).
INTERRUPTED_START = """import importlib.abc, os, runpy, signal, sys
class Signal(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "serving.frontend.config":
            os.kill(os.getpid(), signal.{signal})
sys.meta_path.insert(0, Signal())
runpy.run_module("serving.stack", run_name="__main__", alter_sys=True)
"""

# The front end stopped by SIGTERM as the stack runs it; prints the SIGTERM handler once asyncio.run closed its loop.
FRONT_END_STOPPED = """import asyncio, os, signal
from serving.frontend.config import FrontendConfig
from serving.frontend.server import serve
from serving.interrupts import stop_on_repeat
from serving.triton.ports import free_port
config = FrontendConfig(listen="127.0.0.1:0", triton_url=f"127.0.0.1:{free_port()}", metrics_port=0, warmup=False,
                        shutdown_grace_s=1.0)
asyncio.run(serve(config, ready=lambda: os.kill(os.getpid(), signal.SIGTERM), stopping=stop_on_repeat))
print(getattr(signal.getsignal(signal.SIGTERM), "__name__", signal.getsignal(signal.SIGTERM)))
"""


def _flags(tmp_path: Path, ports: Ports, listen: Ports) -> list[str]:
    return [
        f"--model-repository={tmp_path / 'repository'}",
        f"--build-dir={tmp_path / 'build'}",
        "--triton-ports",
        *map(str, (ports.http, ports.grpc, ports.metrics)),
        f"--listen=127.0.0.1:{listen.http}",
        f"--http-listen=127.0.0.1:{listen.grpc}",
        f"--metrics-port={listen.metrics}",
    ]


def _servers(repository: Path) -> list[int]:
    argument = f"--model-repository={repository}".encode()
    return [pid for pid, stat, argv in processes() if stat.name == "tritonserver" and argument in argv]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_while_triton_loads_its_models_leaves_nothing(
    tmp_path: Path, tiny_onnx: Path, tiny_checkpoint: Path, signum: signal.Signals
) -> None:
    # Before: SIGTERM exited 143 with no word, Triton died by its parent-death signal and the stub loading its model
    # was left to init; SIGINT printed a KeyboardInterrupt traceback.
    (tmp_path / "build").mkdir()
    (tmp_path / "build" / "onnx").symlink_to(tiny_onnx.parent)  # the session's export: no export here
    ports = Ports.free()
    flags = _flags(tmp_path, ports, Ports.free())
    stack = subprocess.Popen(
        [sys.executable, "-m", "serving.stack", f"--checkpoint={tiny_checkpoint}", *flags],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    repository = (tmp_path / "repository").resolve()
    try:
        deadline = time.monotonic() + 120
        while not stubs_of_repository(repository):  # Triton is loading: its first stubs run
            assert stack.poll() is None and time.monotonic() < deadline, "Triton did not start loading"
            time.sleep(0.05)
        stack.send_signal(signum)
        _, stderr = stack.communicate(timeout=60)
    finally:
        if stack.poll() is None:
            stack.kill()
            stack.wait()
    log = stderr.decode()
    assert stack.returncode == 0, log
    assert f"{signum.name} while tritonserver was loading its models: stopped" in log
    assert "Traceback" not in log
    assert not _servers(repository)
    left = [pid for pid, _, _ in stubs_of_repository(repository) if alive(pid)]
    assert not left, f"stubs left: {left}"
    assert not list(SHM.glob(f"{region_prefix(ports.grpc)}*"))


def test_a_stop_during_the_repository_build_is_logged(tmp_path: Path) -> None:
    # Before: exit status 143 and not a word (the partial export is swept by the next start, as before).
    flags = _flags(tmp_path, Ports.free(), Ports.free())
    ended = subprocess.run([sys.executable, "-c", INTERRUPTED_BUILD, *flags], cwd=ROOT, capture_output=True, timeout=60)
    log = ended.stderr.decode()
    assert ended.returncode == 0, log
    assert "SIGTERM while building the model repository: stopped" in log and "Traceback" not in log


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_right_after_the_start_is_logged(tmp_path: Path, signum: signal.Signals) -> None:
    # Before: the handlers came in main, after the module's imports (0.3-1.2 s): SIGTERM exited 143 with no word,
    # SIGINT printed a KeyboardInterrupt traceback.
    script = INTERRUPTED_START.format(signal=signum.name)
    flags = _flags(tmp_path, Ports.free(), Ports.free())
    ended = subprocess.run([sys.executable, "-c", script, *flags], cwd=ROOT, capture_output=True, timeout=60)
    log = ended.stderr.decode()
    assert ended.returncode == 0, log
    assert log.splitlines()[-1].endswith(f"{signum.name} while starting: stopped; no tritonserver or stub left"), log
    assert "Traceback" not in log
    assert not (tmp_path / "repository").exists()


def test_a_stop_while_torch_is_imported_is_logged(tmp_path: Path) -> None:
    # Before: the handler came after the flag checks and torch's import: exit status 143 and not a word.
    flags = _flags(tmp_path, Ports.free(), Ports.free())
    ended = subprocess.run(
        [sys.executable, "-c", INTERRUPTED_IMPORT, *flags], cwd=ROOT, capture_output=True, timeout=60
    )
    log = ended.stderr.decode()
    assert ended.returncode == 0, log
    assert "SIGTERM while importing torch: stopped" in log and "Traceback" not in log
    assert not (tmp_path / "repository").exists()  # stopped before the build


def test_a_refused_flag_leaves_the_callers_signal_handlers() -> None:
    from serving import stack

    before = [signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)]
    with pytest.raises(SystemExit):
        stack.main(["--max-in-flight", "0"])
    assert [signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)] == before


def test_the_stop_handler_outlives_the_front_ends_event_loop() -> None:
    # Before: closing the loop put back Python's default, so a SIGTERM while asyncio.run wound down (before the stack
    # installed its own again) exited 143 and could leave Triton's stubs behind.
    ended = subprocess.run([sys.executable, "-c", FRONT_END_STOPPED], cwd=ROOT, capture_output=True, timeout=60)
    assert ended.returncode == 0, ended.stderr.decode()
    assert ended.stdout.decode().strip() == "_repeated"

"""The Triton container's liveness probe (serving/triton/stub_probe.py) against the real server: a model whose stub
process was killed stays READY and Triton's health SERVING (Triton 2.51), so only the probe's own look at the stub
processes tells; it fails, naming the model, until the model is loaded again."""

from __future__ import annotations

import os
import signal
import time

import pytest

from serving.frontend.process import FrontendProcess
from serving.health_probe import serving
from serving.triton import stub_probe
from serving.triton.launcher import TritonServer
from serving.triton.model_names import MLLM_MODEL
from serving.triton.watchdog import ProcStat, stub_processes
from tests.integration.watchdog_pause import watchdog_paused


def test_a_model_whose_stub_died_fails_the_probe(
    triton: TritonServer, api: FrontendProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    assert triton.process is not None
    probe = ["--address", triton.grpc_url, "--server-pid", str(triton.process.pid)]
    assert stub_probe.main(probe) == 0
    with watchdog_paused(triton, api, MLLM_MODEL) as admin:
        (stub,) = stub_processes(triton.process.pid)[MLLM_MODEL]
        os.kill(stub, signal.SIGKILL)  # idle: not holding the Python backend's shared-memory lock
        deadline = time.monotonic() + 10
        while stub in stub_processes(triton.process.pid)[MLLM_MODEL] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert admin.is_model_ready(MLLM_MODEL) and serving(triton.grpc_url)  # why Triton's own health is not enough
        capsys.readouterr()
        assert stub_probe.main(probe) == 1
        assert f"model(s) {MLLM_MODEL} READY with no live stub process" in capsys.readouterr().out
    assert stub_probe.main(probe) == 0  # loaded again


def test_the_server_is_found_by_name_or_must_be_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside a container the one tritonserver is found by its name; beside none or several, it must be named."""

    def seen(*names: str) -> None:
        listed = [(100 + i, ProcStat(name, "S", 1, 0), [name.encode()]) for i, name in enumerate(names)]
        monkeypatch.setattr(stub_probe, "processes", lambda: iter(listed))

    seen("python3", "tritonserver", "bash")
    assert stub_probe.server_pid() == 101
    for names in ((), ("tritonserver", "tritonserver")):
        seen(*names)
        with pytest.raises(stub_probe.ProbeError, match="pass --server-pid"):
            stub_probe.server_pid()

"""A start whose `tritonserver` aborts on the Python backend's boost::interprocess::lock_exception (an open Triton
bug, triton-inference-server/server#8882) is retried a bounded number of times; any other failed start is not. A bash
stand-in in Triton's install layout (OMNIGEN2_TRITONSERVER) plays the crash, then execs the real server."""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import pytest

from serving.triton import launcher
from serving.triton.install import TRITONSERVER_ENV, TritonInstall
from serving.triton.launcher import LOCK_CRASH_ISSUE, START_CRASH_RETRIES, TritonServer
from tests.test_triton_install import fake_install

LOCK_CRASH_LOG = """I1127 00:18:24.688708 2481 python_be.cc] "TRITONBACKEND_ModelInstanceInitialize: vae_decoder_0_0"
terminate called after throwing an instance of 'boost::interprocess::lock_exception'
  what():  boost::interprocess::lock_exception"""
OTHER_CRASH_LOG = "E1127 00:18:24.688708 2481 model_config_utils.cc:716] free(): invalid pointer"


def _stand_in(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, crash_log: str, crashes: int) -> Path:
    """Installs a `tritonserver` that logs `crash_log` and aborts on its first `crashes` runs, then execs the real
    one; returns the file counting its runs."""
    real = TritonInstall.find()
    root = fake_install(tmp_path / "triton", ())
    runs = tmp_path / "runs"
    binary = root / "bin" / "tritonserver"
    binary.write_text(
        f"""#!/bin/bash
echo run >> {runs}
if [ "$(wc -l < {runs})" -le {crashes} ]; then
    cat <<'LOG'
{crash_log}
LOG
    ulimit -c 0
    kill -ABRT $$
fi
export LD_LIBRARY_PATH={real.libs}:$LD_LIBRARY_PATH
exec {real.binary} "$@"
"""
    )
    binary.chmod(0o755)
    monkeypatch.setenv(TRITONSERVER_ENV, str(root))
    (tmp_path / "repository").mkdir()  # no models: the real server is ready at once
    return runs


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == launcher.__name__ and r.levelno == logging.WARNING]


def test_a_start_that_aborts_on_the_lock_exception_is_retried(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    runs = _stand_in(monkeypatch, tmp_path, LOCK_CRASH_LOG, crashes=1)
    server = TritonServer(tmp_path / "repository", build_dir=tmp_path / "build")
    with caplog.at_level(logging.WARNING, logger=launcher.__name__):
        server.start(timeout=60)
    try:
        assert server.process is not None and server.process.poll() is None
        assert runs.read_text().count("run") == 2
        [warning] = _warnings(caplog)
        assert LOCK_CRASH_ISSUE in warning and "retry 1 of 2" in warning
        kept = server.log_path.with_name(f"{server.log_path.name}.1")
        assert "lock_exception" in kept.read_text() and "lock_exception" not in server.log_tail()  # a fresh log
    finally:
        server.stop()


def test_the_retries_are_bounded(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    runs = _stand_in(monkeypatch, tmp_path, LOCK_CRASH_LOG, crashes=START_CRASH_RETRIES + 1)
    server = TritonServer(tmp_path / "repository", build_dir=tmp_path / "build")
    with caplog.at_level(logging.WARNING, logger=launcher.__name__), pytest.raises(RuntimeError) as failed:
        server.start(timeout=60)
    assert f"exited with {-signal.SIGABRT}" in str(failed.value) and "lock_exception" in str(failed.value)
    assert runs.read_text().count("run") == START_CRASH_RETRIES + 1
    assert len(_warnings(caplog)) == START_CRASH_RETRIES


def test_a_start_that_aborts_otherwise_fails_at_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    runs = _stand_in(monkeypatch, tmp_path, OTHER_CRASH_LOG, crashes=1)
    server = TritonServer(tmp_path / "repository", build_dir=tmp_path / "build")
    with caplog.at_level(logging.WARNING, logger=launcher.__name__), pytest.raises(RuntimeError) as failed:
        server.start(timeout=60)
    assert f"exited with {-signal.SIGABRT}" in str(failed.value) and "free(): invalid pointer" in str(failed.value)
    assert runs.read_text().count("run") == 1
    assert not _warnings(caplog)

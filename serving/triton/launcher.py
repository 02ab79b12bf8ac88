"""Start, watch and stop a `tritonserver` on loopback.

    python -m serving.triton.launcher --model-repository model_repository

The server is the first of: the install that env OMNIGEN2_TRITONSERVER names, the NGC container's
/opt/tritonserver, the nvidia-pytriton wheel's (serving/triton/install.py); its ports are loopback ones
(serving/triton/ports.py).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import tritonclient.grpc as triton_grpc

from serving.triton import leftovers, lifeline, memory
from serving.triton.install import TritonInstall
from serving.triton.ports import LOOPBACK, Ports, port_in_use
from serving.triton.supervisor import TritonSupervisor
from serving.triton.watchdog import StubWatchdog
from serving.triton.wire import RECONNECT_OPTIONS

UNLOADING = b"All models are stopped, unloading models"  # Triton's log line once nothing is in flight
UNLOADED = re.compile(rb"successfully unloaded '([^']+)'")  # Triton's log line per model unloaded
LOADED = re.compile(rb"successfully loaded '([^']+)'")  # and per model loaded
EXIT_GRACE_S = 3.0  # Triton exits at its once-a-second check after its last model unloaded (1.5 s: killed under load)
MMAP_THRESHOLD_ENV = "MALLOC_MMAP_THRESHOLD_"  # glibc's; one the caller's environment sets is kept
MMAP_THRESHOLD = 1 << 20  # blocks this large or larger are mapped on their own and unmapped when freed
STUB_MMAP_THRESHOLD = 32 << 20  # the most glibc raises its own threshold to (64-bit)
# A pooled gRPC response keeps its output buffers' capacity when reused (protobuf clears, never frees): each pooled
# stream held its largest output for good, one 8 x 4096x4096 answer 385 MiB.
NO_RESPONSE_POOL = "--grpc-infer-allocation-pool-size=0"
# While Triton loads its models (seconds for the tiny checkpoint, minutes for real weights) the wait logs which have
# loaded this often, from Triton's log (its gRPC port opens only once all have), so that a long start shows progress.
PROGRESS_INTERVAL_S = 5.0
KEPT_LOGS = 8  # the other servers' logs kept in a build folder, newest first
# Triton 2.51's Python backend sometimes aborts (SIGABRT) on this while its model instances initialize, more often on
# a busy CPU: an open upstream bug. A start that died so is retried this many times; any other failure is not.
LOCK_CRASH = b"boost::interprocess::lock_exception"
LOCK_CRASH_ISSUE = "triton-inference-server/server#8882"
START_CRASH_RETRIES = 2
log = logging.getLogger(__name__)


def prune_logs(folder: Path, keep: Path, kept: int = KEPT_LOGS) -> None:
    """Removes all but the `kept` newest server logs in `folder` (each port's, with its `.1` from a restart) besides
    `keep`: a log per port, with ports chosen anew (tests, several stacks), would pile up without bound. A log whose
    gRPC port (in its name) is in use is kept: a live server's, idle for long, of another stack sharing the folder."""
    logs = [
        path
        for path in folder.glob("tritonserver*.log*")
        if path.is_file() and path.name != keep.name and not _in_use(path)
    ]
    logs.sort(key=lambda path: path.stat().st_mtime, reverse=True)
    for stale in logs[kept:]:
        stale.unlink(missing_ok=True)


def _in_use(log: Path) -> bool:
    """Whether the port in a server log's name (`tritonserver-<gRPC port>.log[.1]`) is held: its server lives."""
    found = re.fullmatch(r"tritonserver-(\d+)\.log(?:\.\d+)?", log.name)
    return found is not None and 0 < int(found[1]) <= 65_535 and port_in_use(int(found[1]))


class TritonServer:
    """One `tritonserver` process bound to loopback; a context manager that always stops it."""

    def __init__(
        self,
        model_repository: Path,
        ports: Ports | None = None,
        build_dir: Path = Path("build"),
        log_path: Path | None = None,
    ) -> None:
        self.model_repository = model_repository.resolve()
        self.ports = ports or Ports.free()
        self.build_dir = build_dir
        # One log per server: two stacks on one build folder (on other ports) wrote one file, and each read the
        # other's load progress from it.
        self.log_path = log_path or build_dir / f"tritonserver-{self.ports.grpc}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.watchdog: StubWatchdog | None = None
        self.supervisor: TritonSupervisor | None = None
        # Every stub of this server, first or reloaded, names its shared-memory region (/dev/shm) with this prefix:
        # what it leaves is found by name (serving/triton/leftovers.py).
        self.shm_prefix = leftovers.region_prefix(self.ports.grpc)

    @property
    def grpc_url(self) -> str:
        return f"{LOOPBACK}:{self.ports.grpc}"

    def command(self, install: TritonInstall) -> list[str]:
        return [
            str(install.binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={install.backend_directory(self.build_dir)}",
            f"--http-address={LOOPBACK}",
            f"--http-port={self.ports.http}",
            f"--grpc-address={LOOPBACK}",
            f"--grpc-port={self.ports.grpc}",
            f"--metrics-address={LOOPBACK}",
            f"--metrics-port={self.ports.metrics}",
            "--strict-readiness=true",
            # The repository is read once at start-up, never polled; explicit control lets the watchdog reload a
            # model whose stub died (serving/triton/watchdog.py).
            "--model-control-mode=explicit",
            "--load-model=*",
            # The generated configs are complete: auto-completing them only started one more Python stub per model
            # (importing torch, the BLS, the MLLM) before its real one, about half of Triton's start on 2 cores.
            "--disable-auto-complete-config",
            "--exit-on-error=true",
            NO_RESPONSE_POOL,
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
        ]

    def start(self, timeout: float = 180.0, cancel: threading.Event | None = None) -> TritonServer:
        """Starts the server and waits until it is ready (or `cancel` is set); `timeout` bounds the whole start,
        the retries of a known start-up crash (START_CRASH_RETRIES) included."""
        install = TritonInstall.find()
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError("tritonserver is running already: stop() it first")
        self.ports.check_free()
        self.clean_up()  # a previous server's, if it was killed
        deadline = time.monotonic() + timeout
        for attempt in range(1, START_CRASH_RETRIES + 2):
            process = self._spawn(install)
            try:
                self.wait_ready(max(deadline - time.monotonic(), 0.0), cancel)
            except BaseException as exc:  # an interrupt or a caller's own time limit too: no server left behind
                self._terminate()
                if attempt > START_CRASH_RETRIES or not self._lock_crash(exc, cancel):
                    raise
                log.warning(
                    "tritonserver aborted while starting (boost::interprocess::lock_exception in its Python backend, "
                    "%s); its stubs and shared memory removed, starting it again (retry %d of %d; its log: %s)",
                    LOCK_CRASH_ISSUE,
                    attempt,
                    START_CRASH_RETRIES,
                    self.keep_log(),
                )
            else:
                break
        if self.watchdog is not None:
            self.watchdog.stop()  # the previous server's, on a restart
        self.watchdog = StubWatchdog(process.pid, self.grpc_url).start()
        return self

    def _spawn(self, install: TritonInstall) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        # The Python-backend stubs import this venv's packages, so they must run on this interpreter's own
        # libpython (not another 3.11 the system may have: its extension modules would not link), and the
        # server needs the wheel's libraries.
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        libpython = sysconfig.get_config_var("LIBDIR") if sysconfig.get_config_var("Py_ENABLE_SHARED") else None
        env["LD_LIBRARY_PATH"] = ":".join(p for p in (libpython, env.get("LD_LIBRARY_PATH"), str(install.libs)) if p)
        env[leftovers.LAUNCHER_ENV] = str(os.getpid())  # its parent while this process lives (leftovers.py)
        # glibc raises its mmap threshold (up to 32 MiB) as large blocks are freed, and the heap then keeps what the
        # next large output freed: Triton, which cannot be told to malloc_trim, held 190-250 MB more after a second
        # 8 x 4096x4096 answer. A fixed threshold ends the raising. The stubs inherit it but take glibc's ceiling
        # instead (memory.use_stub_mmap_threshold: at 1 MiB their tensors ran slower), and trim once idle.
        if MMAP_THRESHOLD_ENV not in env:
            env[MMAP_THRESHOLD_ENV] = str(MMAP_THRESHOLD)
            env[memory.STUB_MMAP_THRESHOLD_ENV] = str(STUB_MMAP_THRESHOLD)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        prune_logs(self.log_path.parent, keep=self.log_path)
        with self.log_path.open("wb") as log:
            # Killed with this process, whichever way it ends (serving/triton/lifeline.py): an orphan would hold the
            # ports and its stubs' memory.
            self.process = lifeline.popen(
                self.command(install), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        return self.process

    def _lock_crash(self, failure: BaseException, cancel: threading.Event | None) -> bool:
        """Whether a start failed because its server aborted on the Python backend's lock_exception
        (LOCK_CRASH_ISSUE), and was not cancelled meanwhile."""
        return (
            isinstance(failure, RuntimeError)
            and not (cancel is not None and cancel.is_set())
            and self.process is not None
            and self.process.returncode == -signal.SIGABRT
            and LOCK_CRASH in self._log_since(0)
        )

    def keep_log(self) -> Path:
        """Moves the log of a server that died aside (`<log>.1`, replacing an older one), so that the next start
        writes a fresh one; returns where it went."""
        kept = self.log_path.with_name(f"{self.log_path.name}.1")
        if self.log_path.is_file():
            self.log_path.replace(kept)
        return kept

    def supervise(self, on_give_up: Callable[[str], None], restarts: int = 3) -> TritonSupervisor:
        """Restart the server when it dies unasked, up to `restarts` times in 10 minutes (serving/triton/supervisor.py);
        stop() ends the supervision first."""
        self.supervisor = TritonSupervisor(self, on_give_up, restarts).start()
        return self.supervisor

    def wait_ready(self, timeout: float, cancel: threading.Event | None = None) -> None:
        client = triton_grpc.InferenceServerClient(self.grpc_url, channel_args=RECONNECT_OPTIONS)
        started = time.monotonic()
        deadline = started + timeout
        progress_at = started + PROGRESS_INTERVAL_S
        log.info("tritonserver starting on %s (log: %s)", self.grpc_url, self.log_path)
        while time.monotonic() < deadline:
            if cancel is not None and cancel.is_set():
                raise RuntimeError("tritonserver start cancelled: the server is being stopped")
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {self.process.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(Exception):
                if client.is_server_ready():
                    log.info("tritonserver ready after %.0f s", time.monotonic() - started)
                    return
            if time.monotonic() >= progress_at:
                log.info("tritonserver loading models (%.0f s): %s", time.monotonic() - started, self.load_progress())
                progress_at += PROGRESS_INTERVAL_S
            time.sleep(0.25)
        self._terminate()
        raise TimeoutError(f"tritonserver not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def load_progress(self) -> str:
        """Which models of the repository Triton's log says have loaded, and which have not yet."""
        models = self._model_names()
        loaded = models & {name.decode() for name in LOADED.findall(self._log_since(0))}
        waiting = ", ".join(sorted(models - loaded)) or "none"
        return f"{len(loaded)} of {len(models)} loaded ({', '.join(sorted(loaded)) or 'none'}); waiting for {waiting}"

    def _model_names(self) -> set[str]:
        """The repository's models, as Triton's log names them."""
        return {config.parent.name for config in self.model_repository.glob("*/config.pbtxt")}

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.is_file():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 30.0, unload_grace_s: float = 5.0, exit_grace_s: float = EXIT_GRACE_S) -> None:
        """SIGTERM: Triton drains the requests in flight (up to `timeout`), then unloads its models; the process
        group is killed if it is still there after either.

        Unloading a model can hang until Triton's own exit timeout (30 s) with its stub idle: Triton 2.51 waits
        forever on a cancellation it issued for a request already answered when a caller cancelled its stream late
        (docs/reliability.md). The front end no longer does that, but another Triton client may, so the hang stays
        bounded: nothing is in flight by then, and unloading gets `unload_grace_s` (it takes 1-2 s) before the kill.
        Once the log says every model of the repository unloaded (their stubs have ended), Triton gets
        `exit_grace_s` to exit: it counts a model whose stub was killed (and that the watchdog reloaded) as live
        until its exit timeout, though nothing of it is left to unload.
        """
        if self.supervisor is not None:
            self.supervisor.stop()  # an exit asked for: not one to restart
        self._terminate(timeout, unload_grace_s, exit_grace_s)

    def _terminate(
        self, timeout: float = 30.0, unload_grace_s: float = 5.0, exit_grace_s: float = EXIT_GRACE_S
    ) -> None:
        if self.watchdog is not None:
            self.watchdog.stop()  # stubs end with the server: not a failure to repair
        if self.process is None:
            return
        if self.process.poll() is None:
            logged = self.log_path.stat().st_size if self.log_path.is_file() else 0
            self.process.send_signal(signal.SIGTERM)
            exited = False
            try:
                exited = self._exited(timeout, logged, unload_grace_s, exit_grace_s)
            finally:
                if not exited:
                    with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
                        os.killpg(self.process.pid, signal.SIGKILL)
                    self.process.wait()
        self.clean_up()

    def _exited(self, timeout: float, logged: int, unload_grace_s: float, exit_grace_s: float) -> bool:
        """Waits for the process to end after SIGTERM; False once `timeout` passed, `unload_grace_s` after the log
        (from byte `logged` on) says the models are unloading, or `exit_grace_s` after it says each one unloaded."""
        assert self.process is not None
        models = {name.encode() for name in self._model_names()}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.process.wait(0.1)
                return True
            except subprocess.TimeoutExpired:
                pass
            log = self._log_since(logged)
            if UNLOADING in log:
                unloaded = bool(models) and models <= set(UNLOADED.findall(log))
                deadline = min(deadline, time.monotonic() + (exit_grace_s if unloaded else unload_grace_s))
        return False

    def _log_since(self, offset: int) -> bytes:
        try:
            with self.log_path.open("rb") as log:
                log.seek(offset)
                return log.read()
        except OSError:  # a log moved away: the wait falls back to the whole timeout
            return b""

    def clean_up(self) -> None:
        """What a server on these ports that ended without its own clean-up (killed, crashed) left: its stubs and
        their shared-memory regions (serving/triton/leftovers.py). For a server that is not running (ended, or not
        started yet)."""
        if self.watchdog is not None:
            self.watchdog.stop()  # stubs that end with their server are not models to reload
        leftovers.clean_up(self.shm_prefix, self.model_repository)

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--build-dir", type=Path, default=Path("build"))
    args = parser.parse_args(argv)
    server = TritonServer(
        args.model_repository, Ports(args.http_port, args.grpc_port, args.metrics_port), build_dir=args.build_dir
    )
    server.start()
    print(f"tritonserver ready: gRPC {server.grpc_url}, log {server.log_path}", flush=True)
    stopping = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        while not stopping and server.process is not None and server.process.poll() is None:
            time.sleep(0.5)
    finally:
        server.stop()


if __name__ == "__main__":
    main()

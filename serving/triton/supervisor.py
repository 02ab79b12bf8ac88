"""Restarts a `tritonserver` that died on its own, a bounded number of times.

A server that exits unasked (killed, OOM, a crash) has its stubs killed and their shared memory unlinked
(TritonServer.clean_up; unreaped, the server stayed a zombie and its stubs, whose parent it still was, lived on), is
reaped, and is started again on the same ports with the same repository (its log kept as
`tritonserver-<gRPC port>.log.1`); the front end reconnects and warms it by itself.
More than `restarts` deaths within `window_s` is not a transient fault a restart cures: the supervisor gives up and
calls `on_give_up`, so that the stack exits non-zero and the outer supervisor (Kubernetes, systemd) takes over. An
unexpected error of its own (in a clean-up, a restart) gives up the same way, rather than leave Triton unwatched.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from serving.triton.launcher import TritonServer

log = logging.getLogger(__name__)


def _ended(process: subprocess.Popen[bytes]) -> bool:
    """Whether the process ended, without reaping it: until then its stubs stay its children, which the watchdog
    does not take for stubs that died."""
    if process.returncode is not None:
        return True
    try:
        return os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # reaped already
        return True


class TritonSupervisor:
    def __init__(
        self,
        server: TritonServer,
        on_give_up: Callable[[str], None],
        restarts: int = 3,
        window_s: float = 600.0,
        backoff_s: float = 1.0,
        interval_s: float = 0.5,
    ) -> None:
        self.server = server
        self.on_give_up = on_give_up
        self.restarts = restarts
        self.window_s = window_s
        self.backoff_s = backoff_s
        self.interval_s = interval_s
        self.gave_up: str | None = None  # why, once it did
        self._deaths: deque[float] = deque()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="triton-supervisor", daemon=True)

    def start(self) -> TritonSupervisor:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Before the server is stopped on purpose: its exit is then not one to repair (a restart under way is
        cancelled)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._check()
            except Exception as exc:  # not a silent end: Triton would stay dead with nothing to restart it
                log.exception("supervising tritonserver failed")
                if not self._stop.is_set():
                    self._give_up(f"supervising tritonserver failed ({exc!r}); giving up: not restarting it")
            if self.gave_up is not None:
                return

    def _check(self) -> None:
        process = self.server.process
        if process is None or not _ended(process):
            return
        self.server.clean_up()
        self._restart(process.pid, process.wait())

    def _give_up(self, reason: str) -> None:
        self.gave_up = reason
        log.error("%s", reason)
        self.on_give_up(reason)

    def _restart(self, pid: int, status: int) -> None:
        now = time.monotonic()
        self._deaths.append(now)
        while self._deaths and now - self._deaths[0] > self.window_s:
            self._deaths.popleft()
        deaths = len(self._deaths)
        if deaths > self.restarts:
            self._give_up(
                f"tritonserver died {deaths} times within {self.window_s:.0f} s (pid {pid}, last exit status "
                f"{status}); giving up: not restarting it again (log: {self.server.log_path})"
            )
            return
        delay = self.backoff_s * 2 ** (deaths - 1)
        log.error(
            "tritonserver (pid %d) died unasked, exit status %d; its stubs killed and shared memory removed; "
            "restarting it in %.0f s (restart %d of at most %d within %.0f s). Log tail:\n%s",
            pid,
            status,
            delay,
            deaths,
            self.restarts,
            self.window_s,
            self.server.log_tail(10),
        )
        if self._stop.wait(delay):
            return
        self.server.keep_log()
        try:
            self.server.start(cancel=self._stop)
        except Exception as exc:  # its exit is seen on the next round, and counted as a death
            log.error("restarting tritonserver failed: %s", exc)
        else:
            log.warning("tritonserver restarted (pid %d)", self.server.process.pid if self.server.process else -1)

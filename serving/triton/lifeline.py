"""Child processes that end with this one, however it ends.

A `tritonserver` that outlived the stack (SIGKILL, the OOM killer) kept its ports and its stubs' memory, and the next
`make serve` on those ports refused to start. A child started here has SIGKILL as its parent-death signal
(prctl PR_SET_PDEATHSIG): the kernel kills it as its parent ends, whichever way.

The kernel sends that signal when the *thread* that forked the child ends, not the process: the supervisor restarts
Triton from its own thread, which ends (stop()) while that Triton runs on. So every child is forked by one thread that
lives as long as the process. The signal is set in the child between fork and exec by this file, run as a script on
this interpreter (-I -S: the standard library only; subprocess's preexec_fn is unsafe in a process with threads),
which then execs the command. A parent that ended before the signal was set is seen as another parent: the child
exits instead.
"""

from __future__ import annotations

import ctypes
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, NoReturn

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

Popen = subprocess.Popen[bytes]


def popen(command: list[str], **options: Any) -> Popen:
    """subprocess.Popen(command, **options), for a child that gets SIGKILL when this process ends. `command[0]` is
    looked up on the PATH of the child's environment."""
    tethered = [sys.executable, "-I", "-S", __file__, str(os.getpid()), *command]
    return _SPAWNER.run(lambda: subprocess.Popen(tethered, **options))


class _Spawner:
    """The thread that forks every child: started once, it waits for the next one until the process ends."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._starts: queue.SimpleQueue[tuple[Callable[[], Popen], Future[Popen]]] = queue.SimpleQueue()

    def run(self, start: Callable[[], Popen]) -> Popen:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():  # not alive: a forked copy of this process
                self._thread = threading.Thread(target=self._serve, name="lifeline-spawner", daemon=True)
                self._thread.start()
        done: Future[Popen] = Future()
        self._starts.put((start, done))
        return done.result()

    def _serve(self) -> None:
        while True:
            start, done = self._starts.get()
            try:
                done.set_result(start())
            except BaseException as exc:  # the caller's to handle, in its own thread
                done.set_exception(exc)


_SPAWNER = _Spawner()


def _exec_tethered(parent: int, command: list[str]) -> NoReturn:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(ctypes.c_int(PR_SET_PDEATHSIG), ctypes.c_ulong(signal.SIGKILL)) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"prctl(PR_SET_PDEATHSIG): {os.strerror(error)}")
    if os.getppid() != parent:  # it ended before the signal was set: none will come
        sys.exit(f"{command[0]}: not started, its parent (pid {parent}) has ended")
    os.execvp(command[0], command)


if __name__ == "__main__":
    _exec_tethered(int(sys.argv[1]), sys.argv[2:])

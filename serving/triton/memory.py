"""Gives freed memory back to the system once a model has gone idle.

Every Python-backend model is a process of its own, and glibc keeps the heap pages a burst freed: each stub used
to stay at its peak (a burst of four 512x512 pairs left the idle stack 2.3 GB above its baseline). `malloc_trim`
returns them; it runs on a thread of its own, a second after the model's last call ends, never during one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
import time
from collections.abc import Callable
from types import TracebackType

# Set by the launcher for Triton's processes: the mmap threshold its stubs take instead of Triton's own (launcher.py).
STUB_MMAP_THRESHOLD_ENV = "OMNIGEN2_STUB_MMAP_THRESHOLD"
M_TRIM_THRESHOLD = -1  # <malloc.h>
M_MMAP_THRESHOLD = -3


def _libc_function(name: str) -> Callable[..., int] | None:
    library = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(library), name, None) if library else None  # glibc only


def _malloc_trim() -> Callable[[int], int] | None:
    return _libc_function("malloc_trim")


def use_stub_mmap_threshold() -> None:
    """Triton runs with glibc's mmap threshold fixed at 1 MiB, so that the large response buffers it frees go back
    to the system; its stubs inherit that, and there every large tensor was then mapped and unmapped afresh (page
    faults each time: a CPU MLP ran 15 % slower). A stub takes the threshold the launcher names for it instead, and
    gives its heap back with malloc_trim once idle (IdleTrimmer).

    A fixed mmap threshold also fixes the trim threshold, at 128 KiB (mallopt(3)): the freed top of the heap went back
    to the system at every free, and each step's tensors faulted it in again (the BLS's packing of a 1024x1024 step:
    485 faults, 2.5 ms, against 35 and 1.6 ms). A stub keeps twice the threshold, glibc's own rule at its ceiling;
    the idle trim still returns it."""
    value = os.environ.get(STUB_MMAP_THRESHOLD_ENV, "")
    mallopt = _libc_function("mallopt")
    if value.isdigit() and mallopt is not None:  # anything else is not the launcher's: the inherited one stays
        mallopt(ctypes.c_int(M_MMAP_THRESHOLD), ctypes.c_int(int(value)))
        mallopt(ctypes.c_int(M_TRIM_THRESHOLD), ctypes.c_int(2 * int(value)))


class IdleTrimmer:
    """Use around each call (`with trimmer:`); calls may overlap (the BLS serves many at once). `close()` ends its
    thread: a front end embedded in a process that starts and stops many left one running per front end."""

    def __init__(self, idle_s: float = 1.0) -> None:
        self.idle_s = idle_s
        self._trim = _malloc_trim()
        self._busy = 0
        self._last = time.monotonic()
        self._dirty = False
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        if self._trim is not None:
            self._thread = threading.Thread(target=self._run, name="idle-trimmer", daemon=True)
            self._thread.start()

    def __enter__(self) -> None:
        with self._lock:
            self._busy += 1

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        with self._lock:
            self._busy -= 1
            self._last = time.monotonic()
            self._dirty = True

    def close(self, timeout_s: float = 1.0) -> None:
        """Ends the thread, waiting at most `timeout_s` for it (a trim in progress finishes first)."""
        self._closed.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self._closed.wait(self.idle_s):
            with self._lock:
                due = self._dirty and not self._busy and time.monotonic() - self._last >= self.idle_s
                self._dirty = self._dirty and not due
            if due and self._trim is not None:
                self._trim(0)

"""SIGTERM and SIGINT before the front end serves (repository build, ONNX export, Triton loading its models).

Python's defaults ended the stack at once on SIGTERM (exit 143, no message, no clean-up: Triton was killed by its
parent-death signal mid-load and a stub in the middle of loading its model lived on, orphaned, holding its memory and
its /dev/shm region) and raised KeyboardInterrupt on SIGINT (a traceback). Here either signal raises `Interrupted` in
the main thread, which unwinds through the context managers that stop Triton and sweep partial builds; a second
signal while the stop is under way is logged and otherwise ignored, so that the stop runs to its end.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

log = logging.getLogger("omnigen2.stack")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
Handler = Callable[[int, FrameType | None], Any] | int
_before: dict[int, Handler] = {}  # the handlers hold_stops or raise_on_stop found, for restore_stop_signals
_held: list[int] = []  # the stop that came while held, for raise_on_stop to raise


class Interrupted(BaseException):
    """A stop signal arrived; a BaseException so that `except Exception` handlers on the way do not swallow it."""

    def __init__(self, signum: int) -> None:
        self.signal = signal.Signals(signum).name
        super().__init__(self.signal)


def _raise(signum: int, frame: FrameType | None) -> None:
    stop_on_repeat()  # the unwinding that follows must not be interrupted in its turn
    raise Interrupted(signum)


def _repeated(signum: int, frame: FrameType | None) -> None:
    log.warning("%s: already stopping; waiting for tritonserver to end", signal.Signals(signum).name)


def _hold(signum: int, frame: FrameType | None) -> None:
    _held.append(signum)


def hold_stops() -> None:
    """From here on SIGTERM and SIGINT are noted, not acted on, until raise_on_stop raises the first: `python -m
    serving.stack` calls it before its imports (0.3-1.2 s), which an exception would leave half done, outside main's
    clean-up and its one line."""
    _install(_hold)


def raise_on_stop() -> None:
    """From here on the first SIGTERM or SIGINT raises `Interrupted` in the main thread; one held since hold_stops
    is raised at once."""
    _install(_raise)
    if _held:
        _raise(_held[0], None)


def _install(handler: Handler) -> None:
    for signum in STOP_SIGNALS:
        previous = signal.signal(signum, handler)
        if previous is not None:  # None: one not set from Python, which neither signal has
            _before.setdefault(signum, previous)


def restore_stop_signals() -> None:
    """The handlers from before raise_on_stop, once the stack is done (a caller in the same process keeps its own)."""
    for signum, previous in _before.items():
        signal.signal(signum, previous)
    _before.clear()
    _held.clear()


def stop_on_repeat() -> None:
    """The stop is under way: a further SIGTERM or SIGINT is logged, not acted on."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, _repeated)

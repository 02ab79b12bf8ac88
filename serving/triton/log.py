"""Logging for the Triton models: code everywhere uses the standard `logging` module, and a model running inside
Triton's Python backend routes the `serving` loggers into Triton's own log (`pb_utils.Logger`), tracebacks
included, so they land beside the server's messages. Outside Triton (unit tests, tools) nothing is rerouted."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any


class TritonLogHandler(logging.Handler):
    """Writes records through `pb_utils.Logger`, at the matching Triton level."""

    def __init__(self, logger: Any) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        self._levels: list[tuple[int, Callable[[str], None]]] = [
            (logging.ERROR, logger.log_error),
            (logging.WARNING, logger.log_warn),
            (logging.INFO, logger.log_info),
            (logging.NOTSET, logger.log_verbose),
        ]

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            next(write for level, write in self._levels if record.levelno >= level)(message)
        except Exception:  # a logging failure must not fail the request
            self.handleError(record)


def route_to_triton() -> None:
    """Send the `serving` loggers to Triton's log, once per process; a no-op without the Python backend."""
    try:
        import triton_python_backend_utils as pb_utils
    except ImportError:
        return
    root = logging.getLogger("serving")
    if any(isinstance(h, TritonLogHandler) for h in root.handlers):
        return
    root.addHandler(TritonLogHandler(pb_utils.Logger))
    root.setLevel(logging.INFO)
    root.propagate = False

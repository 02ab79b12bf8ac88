"""The log line format of the front end and the stack: UTC timestamps in ISO 8601 with a 'Z', so that lines from
replicas in other zones, or from a host whose zone changed, order and correlate as they are."""

from __future__ import annotations

import logging
import time

FORMAT = "%(asctime)s.%(msecs)03dZ %(name)s %(levelname)s %(message)s"
DATE_FORMAT = "%Y-%m-%dT%H:%M:%S"


class UtcFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(FORMAT, DATE_FORMAT)
        self.converter = time.gmtime  # logging's default is time.localtime, and its format names no zone


def configure(level: int = logging.INFO) -> None:
    """logging.basicConfig with the UTC format on stderr (a no-op if the root logger has handlers already)."""
    handler = logging.StreamHandler()
    handler.setFormatter(UtcFormatter())
    logging.basicConfig(level=level, handlers=[handler])

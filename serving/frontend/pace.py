"""Whether a caller takes what it is sent (or sends its body) at a minimum rate, judged over the time spent waiting
on it: an answer streamed as the work goes waits on the work between its writes, not on the caller.

Shared by a gRPC stream's writes (outbox.py: whole messages, gRPC does not tell how much of one was taken) and the
HTTP gateway's bodies and answers (openai_http.py: bytes); each measures what was taken its own way. After a grace
of `grace_s` waited (a slow start), the bytes taken must keep up with `min_rate` over the waits: a caller granting a
few bytes per write timeout otherwise held its place for as long as its answer lasted.

Of each wait, only what is past its first TAKEN_AT_ONCE_S is the caller's: the rest is the event loop's, busy
elsewhere (grpcio's copy of a 100 MiB upload out of its buffers takes it about 0.1 s; the parse is off the loop,
reading.py, but holds the GIL). A reader of small events taken at once was cut off as slow once the loop's delays
on its writes added up past the grace.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

TAKEN_AT_ONCE_S = 0.05  # the part of each wait that is not the caller's


class Pace:
    def __init__(self, grace_s: float, min_rate: float) -> None:
        self.grace_s = grace_s
        self.min_rate = min_rate  # bytes/s
        self.waited = 0.0  # seconds of the waits that ended, each past its first TAKEN_AT_ONCE_S
        self._since: float | None = None  # the loop's time the wait in progress began

    @contextmanager
    def waiting(self) -> Iterator[None]:
        """A wait on the caller (one at a time), counted in `waited` when it ends."""
        assert self._since is None, "one wait at a time"
        self._since = asyncio.get_running_loop().time()
        try:
            yield
        finally:
            self.waited = self.waited_s()
            self._since = None

    def waited_s(self) -> float:
        """Seconds waited on the caller, the wait in progress included."""
        if self._since is None:
            return self.waited
        return self.waited + max(0.0, asyncio.get_running_loop().time() - self._since - TAKEN_AT_ONCE_S)

    def spare(self, taken: float) -> float:
        """Seconds of waiting left before `taken` bytes fall behind the minimum rate; below 0: behind."""
        return self.grace_s + taken / self.min_rate - self.waited_s()

"""When a call was cancelled: by its caller, its deadline or the server's stop, whichever came first. The call is
recorded by that moment, not by when it ended: a cancelled call waits for its model to confirm the stop
(triton_call.py), seconds at times, and a caller that cancelled before its deadline was counted DEADLINE_EXCEEDED
when the stop came after it. It lives in a context variable for the call's task, as its request id does."""

from __future__ import annotations

import contextvars
import time

import grpc

# gRPC core keeps deadlines in milliseconds: a deadline's cancellation was noted here from 3 ms after the deadline
# time_remaining() gave to (once in a few runs, on this loaded machine) just before it. A cancel this close to the
# deadline is taken for the deadline's.
DEADLINE_SLACK_S = 0.02
_cancelled_at: contextvars.ContextVar[list[float] | None] = contextvars.ContextVar("cancelled_at", default=None)


def begin() -> contextvars.Token[list[float] | None]:
    return _cancelled_at.set([])


def end(token: contextvars.Token[list[float] | None]) -> None:
    _cancelled_at.reset(token)


def note() -> None:
    """Where a cancellation is caught and held back: the first one noted is the call's."""
    marks = _cancelled_at.get()
    if marks is not None and not marks:
        marks.append(time.monotonic())


def cancelled_at() -> float | None:
    """time.monotonic() when the call's cancellation was first noted; None if it was not."""
    marks = _cancelled_at.get()
    return marks[0] if marks else None


def status(cancelled: float, began: float, budget: float | None, cut_at: float | None) -> grpc.StatusCode:
    """What the caller of a call cancelled at `cancelled` saw (time.monotonic(); the call began at `began`, `budget`
    seconds before its deadline, None: no deadline): UNAVAILABLE once the server's stop has cut its calls (at
    `cut_at`: "Cancelling all calls"), else DEADLINE_EXCEEDED once its deadline had passed, else CANCELLED."""
    if cut_at is not None and cancelled >= cut_at:
        return grpc.StatusCode.UNAVAILABLE
    expired = budget is not None and cancelled - began >= budget - DEADLINE_SLACK_S
    return grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED

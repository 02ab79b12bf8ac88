"""Stop requests: how the front end asks a decoupled model (`omnigen2`, `mllm`) to stop a request and still
learns when the work has stopped.

Cancelling the gRPC stream would stop the request too, but it ends the stream at once: the front end could not see
when the model had finished with the request, and would give the call's admission slot back while steps still
ran. Instead each request carries a random key (request parameter `omnigen2_call`), and a second request on the
same stream naming it (parameter `omnigen2_stop`) marks it stopped: the model sees that at its next check, exactly
as it sees a cancellation, and ends the request with its final response (CANCELLED), which the front end waits
for. A stop request itself gets an empty final response, which Triton does not pass on.

Keys live in the process of one model instance: with several instances of a model, a stop request may land on
another one and find nothing; the front end then ends the stream after its grace period.
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Callable
from typing import Any

import triton_python_backend_utils as pb_utils

from serving.triton.wire import CALL_PARAMETER, STOP_PARAMETER


def _parameters(request: Any) -> dict[str, Any]:
    raw = request.parameters()
    parsed = json.loads(raw) if raw else {}
    return parsed if isinstance(parsed, dict) else {}


class Stops:
    """The running requests of this model instance by key; safe across threads (the `mllm` model's).

    Their number is Triton's metric `omnigen2_requests_running{model=...}`: it falls before the request's final
    response is sent, so a front end that has seen that response never finds the request still counted."""

    def __init__(self, model: str) -> None:
        self._running: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        # Kept: Triton drops a metric family whose object is collected.
        self._family = pb_utils.MetricFamily(
            name="omnigen2_requests_running",
            description="Requests a model is working on (stopped or finished ones leave before their final response)",
            kind=pb_utils.MetricFamily.GAUGE,
        )
        self._gauge = self._family.Metric(labels={"model": model})

    def answer(self, request: Any) -> bool:
        """Serves `request` if it is a stop request (True), else leaves it to the model (False)."""
        key = _parameters(request).get(STOP_PARAMETER)
        if key is None:
            return False
        with self._lock:
            stop = self._running.get(str(key))
        if stop is not None:  # unknown: the request has ended already, its final response is on its way
            stop.set()
        request.get_response_sender().send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return True

    def running(self, request: Any) -> Running:
        """The request, registered under its key from this call on, for `with ... as request:` around its work:
        there it is the request whose is_cancelled() is also true once it was asked to stop (so every existing
        cancellation check sees a stop); leaving the block unregisters it. Called before the request's first await
        (the BLS) or on the thread Triton hands requests to, before its worker starts (`mllm`), so a stop request,
        which comes after it, always finds it."""
        key = _parameters(request).get(CALL_PARAMETER)
        stop = threading.Event()
        with self._lock:
            if key is not None:
                self._running[str(key)] = stop
            self._gauge.increment(1)
        return Running(_Stoppable(request, stop), functools.partial(self._leave, None if key is None else str(key)))

    def _leave(self, key: str | None) -> None:
        with self._lock:
            if key is not None:
                self._running.pop(key, None)
            self._gauge.increment(-1)


class Running:
    """A registered request's block: entered for its work, left (unregistered) however the work ends."""

    def __init__(self, request: _Stoppable, leave: Callable[[], None]) -> None:
        self._request, self._leave = request, leave

    def __enter__(self) -> _Stoppable:
        return self._request

    def __exit__(self, *exc: object) -> None:
        self._leave()


class _Stoppable:
    """A Triton request (everything delegated) that also counts as cancelled once asked to stop."""

    def __init__(self, request: Any, stop: threading.Event) -> None:
        self._request = request
        self._stop = stop

    def is_cancelled(self) -> bool:
        return self._stop.is_set() or bool(self._request.is_cancelled())

    def is_stopped(self) -> bool:
        """Asked to stop: a local event, where Triton's is_cancelled() is a round trip to the server."""
        return self._stop.is_set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._request, name)

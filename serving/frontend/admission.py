"""Admission by count and by cost: the calls in flight, and the sum of what the admitted generations hold.

A call takes a slot first (cheap, before its request is validated), then, once its cost is known from the
request and the image headers, reserves that cost against the in-flight budgets. Either refusal is
RESOURCE_EXHAUSTED with RetryInfo; a request that could never fit is refused earlier, by the per-request
budgets (INVALID_ARGUMENT, serving/frontend/budgets.py).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import astuple, dataclass, fields

from serving.frontend.metrics import Metrics
from serving.frontend.status import resource_exhausted


@dataclass(frozen=True)
class Load:
    pixels: int = 0  # decoded input pixels
    step_tokens: int = 0  # transformer tokens of a step
    chat_tokens: int = 0  # an answer's sequence: prompt and image tokens, and the tokens it may add
    # Output images' pixels (n x width x height): the decoded frames, resizes, encodes and response messages held
    # while a generation ends scale with these, not with its tokens (1 step at 256x256 can ask for 8 x 4096x4096).
    output_pixels: int = 0


NAMES = {
    "pixels": "decoded input pixels",
    "step_tokens": "transformer tokens per step",
    "chat_tokens": "answer tokens",
    "output_pixels": "output pixels",
}


class Admission:
    def __init__(self, max_calls: int, capacity: Load, retry_after_s: float, metrics: Metrics) -> None:
        self.max_calls = max_calls
        self.capacity = capacity
        self.retry_after_s = retry_after_s
        self.metrics = metrics
        self.calls = 0
        self.held = Load()
        # The limits beside what is held, for saturation (held / limit) in alerts and autoscaling.
        metrics.max_in_flight.set(max_calls)
        for field, budget in zip(fields(Load), astuple(capacity), strict=True):
            metrics.max_admitted[field.name].set(budget)

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        if self.calls >= self.max_calls:
            raise resource_exhausted(
                f"{self.calls} requests in flight, the limit is {self.max_calls}; retry later", self.retry_after_s
            )
        self.calls += 1
        self.metrics.in_flight.set(self.calls)
        try:
            yield
        finally:
            self.calls -= 1
            self.metrics.in_flight.set(self.calls)

    @contextlib.contextmanager
    def reserve(self, load: Load) -> Iterator[None]:
        """Held until the call's work has stopped (the caller exits this once its model confirmed the end)."""
        for field, held, asked, budget in zip(
            fields(Load), astuple(self.held), astuple(load), astuple(self.capacity), strict=True
        ):
            if held and asked and held + asked > budget:
                raise resource_exhausted(
                    f"{held} {NAMES[field.name]} in flight and this request needs {asked}, the budget is {budget}; "
                    "retry later",
                    self.retry_after_s,
                )
        self._add(load, 1)
        try:
            yield
        finally:
            self._add(load, -1)

    def keep(self, load: Load) -> Callable[[], None]:
        """Holds `load` unchecked until the returned function is called: what a cut-off call leaves with gRPC (its
        last message, queued until its caller takes it or its connection closes), after its reservation ends."""
        self._add(load, 1)
        return functools.partial(self._add, load, -1)

    def _add(self, load: Load, sign: int) -> None:
        self.held = Load(*(held + sign * asked for held, asked in zip(astuple(self.held), astuple(load), strict=True)))
        for field, held in zip(fields(Load), astuple(self.held), strict=True):
            self.metrics.admitted[field.name].set(held)

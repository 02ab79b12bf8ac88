"""Split one batched step into transformer calls so that padding never costs more than an extra call would.

A packed call pads every sample to the longest text, the most reference slots, the longest reference and the
largest image of the call. Mixing an unconditional branch (no references) with branches that carry three
reference images would make it attend over three padded images; on compute-bound hardware that is real work.
Samples are therefore grouped by shape, and two groups share a call only when the padding that sharing adds is
cheaper than the fixed cost of one more call. `CallCost` learns that trade-off from the calls it sees.

Bigger is not always better either: on a CPU, a call whose activations outgrow the caches costs more per token
(benchmarks/README.md, the call token cap), so a call can also be capped at `max_tokens` padded tokens; a group
above the cap is cut into near-equal calls.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

# A transformer call's fixed cost before it is learnt (CallCost): the BLS's default (bls_settings.py) and the eager
# pipeline's, which groups branches as the BLS does.
CALL_OVERHEAD_MS = 10.0


@dataclass(frozen=True)
class SampleShape:
    """Token counts of one transformer sample: text (already bucketed), each reference image, the noisy image."""

    text: int
    refs: tuple[int, ...]
    image: int


def padded_tokens(shapes: Sequence[SampleShape]) -> int:
    """Tokens one packed call over these samples processes (at least one reference slot, as packing keeps)."""
    slots = max(1, max(len(s.refs) for s in shapes))
    ref_len = max([r for s in shapes for r in s.refs], default=1)
    per_sample = max(s.text for s in shapes) + slots * ref_len + max(s.image for s in shapes)
    return len(shapes) * per_sample


def plan_calls(shapes: Sequence[SampleShape], overhead_tokens: float, max_tokens: float = math.inf) -> list[list[int]]:
    """Indices of `shapes` per call, each call in input order. Greedy: merge the pair of groups that saves most.

    A call costs `overhead_tokens` plus the tokens it pads to; with an infinite overhead and no cap everything is
    one call. No merge makes a call exceed `max_tokens`; a call of a single sample may (it cannot be cut).
    """
    by_shape: dict[SampleShape, list[int]] = {}
    for index, shape in enumerate(shapes):
        by_shape.setdefault(shape, []).append(index)
    groups = list(by_shape.values())

    def cost(group: list[int]) -> float:
        return padded_tokens([shapes[i] for i in group])

    while len(groups) > 1:
        best, pair = 0.0, (0, 0)
        for a in range(len(groups)):
            for b in range(a + 1, len(groups)):
                merged = cost(groups[a] + groups[b])
                saving = cost(groups[a]) + cost(groups[b]) + overhead_tokens - merged
                if saving > best and merged <= max_tokens:
                    best, pair = saving, (a, b)
        if best <= 0.0:
            break
        a, b = pair
        groups[a] = groups[a] + groups.pop(b)
    calls = [sorted(g) for g in sorted(groups, key=min)]
    return [chunk for call in calls for chunk in split_call(call, cost(call), max_tokens)]


def split_call(call: list[int], tokens: float, max_tokens: float) -> list[list[int]]:
    """`call` cut into the fewest near-equal consecutive parts within `max_tokens` (only same-shape calls exceed it)."""
    if tokens <= max_tokens:
        return [call]
    fits = max(1, int(max_tokens // (tokens / len(call))))  # samples per part
    parts = math.ceil(len(call) / fits)
    bounds = [len(call) * k // parts for k in range(parts + 1)]  # sizes differ by at most one
    return [call[a:b] for a, b in itertools.pairwise(bounds)]


class CallCost:
    """The fixed cost of a transformer call expressed in padded tokens: `fixed_s` over the observed time per token.

    `fixed_s` is what a call costs whatever its size: the BLS -> component hop, and on CPUs the batch efficiency
    lost by small calls. The per-token time is a running average of (seconds - fixed_s) / tokens over the calls
    seen. Until a call has been seen, or where calls take no longer than `fixed_s` (a tiny model), everything
    shares one call. A fitted fixed part would be neater, but a call's time includes waiting for the cores
    (cpu_lane.py), and that noise made such fits split batches that should share.
    """

    def __init__(self, fixed_s: float, smoothing: float = 0.2) -> None:
        self.fixed_s = fixed_s
        self.smoothing = smoothing
        self.seconds_per_token: float | None = None

    def observe(self, tokens: int, seconds: float) -> None:
        sample = max(seconds - self.fixed_s, 0.0) / max(tokens, 1)
        previous = self.seconds_per_token
        self.seconds_per_token = sample if previous is None else previous + self.smoothing * (sample - previous)

    @property
    def overhead_tokens(self) -> float:
        if not self.seconds_per_token:  # nothing seen yet, or every call within the fixed cost
            return math.inf
        return self.fixed_s / self.seconds_per_token

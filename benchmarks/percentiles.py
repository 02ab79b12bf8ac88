"""How many samples a latency percentile needs before it says anything about the tail."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def min_samples(q: float) -> int:
    """A q-th percentile rests on a sample beyond it only with 100 / (100 - q) samples (10 for p90, 100 for p99);
    with fewer, numpy interpolates between the largest samples and the figure says nothing of the tail."""
    return math.ceil(100 / (100 - q))


def percentile(samples: Sequence[float], q: float) -> float | None:
    """The q-th percentile, or None where there are too few samples for it."""
    return float(np.percentile(samples, q)) if len(samples) >= min_samples(q) else None

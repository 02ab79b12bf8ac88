"""Served images compared as the API promises them. A seeded generation run beside other calls returns the images it
returns alone only to rounding: each denoising step shares transformer calls with whatever else is running, another
batch sums in another order, and a pixel can move by one level of 255 (docs/api.md, the soak's probes)."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image

from benchmarks.soak.worker import max_diff


def level_difference(got: Sequence[bytes], want: Sequence[bytes]) -> int:
    """Largest difference in levels of 255 between two lists of encoded images; 255 if their counts or sizes differ."""

    def levels(images: Sequence[bytes]) -> list[np.ndarray]:
        return [np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.int16) for data in images]

    return max_diff(levels(got), levels(want))

"""The request mixes of the benchmark, each runnable through the SDK and through the eager pipeline."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from serving.pipeline.request import GenerationRequest


def synthetic_image(width: int, height: int, seed: int) -> bytes:
    """A smooth random PNG (gradients + noise): stands in for a photo without shipping one."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    base = np.stack([x, y, 1 - x * y], axis=-1) * rng.uniform(0.5, 1.0, 3)
    pixels = np.clip(base + rng.normal(0, 0.05, base.shape), 0, 1)
    buffer = io.BytesIO()
    Image.fromarray((pixels * 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass(frozen=True)
class Workload:
    name: str
    prompt: str
    size: int
    steps: int
    input_images: int = 0
    cfg_range: tuple[float, float] = (0.0, 1.0)
    images: list[bytes] = field(default_factory=list, compare=False)

    @classmethod
    def make(cls, name: str, prompt: str, size: int, steps: int, inputs: int = 0, **extra: Any) -> Workload:
        images = [synthetic_image(size, size, seed=i) for i in range(inputs)]
        return cls(name, prompt, size, steps, inputs, images=images, **extra)

    def sdk_options(self, seed: int) -> dict[str, Any]:
        return {"width": self.size, "height": self.size, "steps": self.steps, "cfg_range": self.cfg_range, "seed": seed}

    def eager_request(self, seed: int) -> GenerationRequest:
        return GenerationRequest(
            prompt=self.prompt,
            images=[Image.open(io.BytesIO(data)) for data in self.images],
            width=self.size,
            height=self.size,
            steps=self.steps,
            cfg_range=self.cfg_range,
            seed=seed,
        )


def standard_mixes(size: int, steps: int) -> list[Workload]:
    """T2I (cfg_range [0, 1] and [0, 0.6]), edit with 1 image, in-context with 3 images."""
    return [
        Workload.make("t2i", "A red apple on a wooden table", size, steps),
        Workload.make("t2i_cfg0.6", "A red apple on a wooden table", size, steps, cfg_range=(0.0, 0.6)),
        Workload.make("edit_1img", "Make the sky stormy", size, steps, inputs=1),
        Workload.make("incontext_3img", "The person of image 1 holding the cup of image 2 in image 3", size, steps, 3),
    ]

"""Benign test images for the safety classifier: outputs the official pipeline generated for the golden cases, a
drawn smiley (which the detector, usefully for a comparison, scores as a low-confidence detection) and smooth
synthetic gradients. Nothing explicit is made, fetched or stored."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from benchmarks.workloads import synthetic_image

GOLDEN_OUTPUTS = ("edit_one_image_output.png", "f_five_images_output.png", "f_two_per_prompt_output1.png")


def smiley(size: int = 300) -> np.ndarray:
    image = Image.new("RGB", (size, size), (230, 200, 170))
    draw = ImageDraw.Draw(image)
    s = size / 300
    draw.ellipse((50 * s, 50 * s, 250 * s, 250 * s), fill=(240, 210, 180))
    draw.ellipse((100 * s, 110 * s, 130 * s, 140 * s), fill=(0, 0, 0))
    draw.ellipse((170 * s, 110 * s, 200 * s, 140 * s), fill=(0, 0, 0))
    draw.arc((100 * s, 150 * s, 200 * s, 210 * s), 0, 180, fill=(150, 0, 0), width=5)
    return np.asarray(image)


def benign_images(golden: Path) -> list[np.ndarray]:
    """RGB uint8 images of several sizes and aspect ratios."""
    generated = [np.asarray(Image.open(golden / name).convert("RGB")) for name in GOLDEN_OUTPUTS]
    gradients = [
        np.asarray(Image.open(io.BytesIO(synthetic_image(w, h, seed))).convert("RGB"))
        for seed, (w, h) in enumerate([(400, 300), (96, 160)])
    ]
    return [*generated, smiley(), smiley(640)[:, :480], *gradients]

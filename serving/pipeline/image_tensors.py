"""Images <-> the tensors the VAE graphs take: the torch half of image handling (images.py needs no torch)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from serving.pipeline.images import model_size


def preprocess_image(image: Image.Image, max_pixels: int, max_side: int, field: str = "images") -> torch.Tensor:
    """PIL image -> (1, 3, H, W) float32 in [-1, 1], resized with Lanczos to fit the limits."""
    height, width = model_size(image.height, image.width, max_pixels, max_side, field)  # the last guard
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    resized = rgb.resize((width, height), resample=Image.Resampling.LANCZOS)
    array = np.asarray(resized, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0) * 2.0 - 1.0


def postprocess(decoded: torch.Tensor, out_height: int, out_width: int) -> np.ndarray:
    """VAE output (B, 3, h, w) in [-1, 1] -> float32 NHWC in [0, 1] at the output size (bilinear)."""
    resized = F.interpolate(decoded.float(), size=(out_height, out_width), mode="bilinear")
    return (resized / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()

"""ComfyUI's IMAGE (a float tensor [B, H, W, C] in 0..1) to and from the PIL images the SDK takes and gives."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Each frame of a batch as an 8-bit RGB image (an alpha channel, if any, is dropped)."""
    if images.ndim != 4 or images.shape[-1] not in (3, 4):
        raise ValueError(f"IMAGE: a [B, H, W, 3] tensor, got shape {list(images.shape)}")
    rgb = images[..., :3].detach().to("cpu", torch.float32).clamp(0.0, 1.0)
    pixels = (rgb * 255.0).round().to(torch.uint8).numpy()
    return [Image.fromarray(frame) for frame in pixels]


def from_pil(images: list[Image.Image]) -> torch.Tensor:
    """One batch [B, H, W, 3] float32 in 0..1; ComfyUI batches hold images of one size, as one request returns."""
    if not images:
        raise ValueError("IMAGE: no images to make a batch of")
    frames = [np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0 for image in images]
    return torch.from_numpy(np.stack(frames))

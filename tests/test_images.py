"""Sizes, pre- and post-processing of images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from serving.errors import InvalidArgumentError
from serving.pipeline.image_tensors import postprocess, preprocess_image
from serving.pipeline.images import fit_size, generation_size, to_pil, to_uint8


def test_fit_size_never_upscales_and_floors_to_16() -> None:
    assert fit_size(64, 80, 1024 * 1024, 1024) == (64, 80)
    assert fit_size(70, 90, 1024 * 1024, 1024) == (64, 80)
    assert fit_size(2000, 1000, 1024 * 1024, 1024) == (1024, 512)  # side limit wins
    h, w = fit_size(1500, 1500, 512 * 512, 4096)
    assert (h, w) == (512, 512)


def test_generation_size_rules() -> None:
    assert generation_size(None, None, 1024 * 1024, [(64, 80)]) == ((64, 80), (64, 80))
    assert generation_size(96, 64, 1024 * 1024, []) == ((64, 96), (64, 96))
    assert generation_size(None, None, 1024 * 1024, []) == ((1024, 1024), (1024, 1024))
    # Not multiples of 16 or above max_pixels: valid, generated smaller and resized back.
    assert generation_size(100, 50, 1024 * 1024, []) == ((48, 96), (50, 100))
    assert generation_size(2048, 2048, 1024 * 1024, [(64, 64), (64, 64)]) == ((1024, 1024), (2048, 2048))
    # Sides of 1-15 px: generated at 16 and resized down, the other side kept inside max_pixels.
    assert generation_size(8, 64, 1024 * 1024, []) == ((64, 16), (64, 8))
    assert generation_size(1, 1, 1024 * 1024, []) == ((16, 16), (1, 1))
    assert generation_size(4096, 1, 256, []) == ((16, 16), (1, 4096))


def test_preprocess_converts_resizes_and_normalises() -> None:
    image = Image.new("RGBA", (50, 40), (255, 0, 0, 128))
    tensor = preprocess_image(image, 1024 * 1024, 1024)
    assert tensor.shape == (1, 3, 32, 48)
    assert tensor[0, 0].max().item() == pytest.approx(1.0) and tensor[0, 1].min().item() == pytest.approx(-1.0)
    with pytest.raises(InvalidArgumentError, match="too small"):
        preprocess_image(Image.new("RGB", (10, 100)), 1024 * 1024, 1024, field="images[2]")


def test_postprocess_resizes_clamps_and_round_trips_to_pil() -> None:
    decoded = torch.linspace(-2, 2, 3 * 16 * 16).reshape(1, 3, 16, 16)
    out = postprocess(decoded, 20, 24)
    assert out.shape == (1, 20, 24, 3) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    (pil,) = to_pil(to_uint8(out))
    assert pil.size == (24, 20) and pil.mode == "RGB"

"""The 8-bit images the served stack sends are the reference's: each golden `*_output.png` is its float output
rounded, so converting the golden float arrays as the BLS does (to_uint8), and encoding them as the front end does,
must give those PNGs' pixels exactly. The served parity tests allow one level per pixel (the served float images
differ from the golden ones by rounding), which a conversion that floors instead of rounding would also pass."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from serving.frontend.convert import encode_images
from serving.pipeline.images import to_uint8


def _all(cases: dict[str, Any]) -> list[dict[str, Any]]:
    return [*cases["pipeline_cases"], *cases["feature_cases"]]


def _reference_pngs(golden: Path, case: dict[str, Any]) -> np.ndarray:
    """The reference's 8-bit images of a case: <name>_output.png, then <name>_output1.png, ... per image."""
    first = golden / case["output"].replace(".npy", ".png")
    names = [first] + [first.with_name(f"{first.stem}{i}.png") for i in range(1, case["output_shape"][0])]
    return np.stack([np.asarray(Image.open(name).convert("RGB")) for name in names])


def test_every_golden_case_has_its_reference_pngs(cases: dict[str, Any], golden: Path) -> None:
    for case in _all(cases):
        assert list(_reference_pngs(golden, case).shape) == case["output_shape"], case["name"]


@pytest.mark.parametrize("encode", [False, True], ids=["to_uint8", "png"])
def test_eight_bit_images_are_the_reference_pngs(cases: dict[str, Any], golden: Path, encode: bool) -> None:
    for case in _all(cases):
        images = to_uint8(np.load(golden / case["output"]))
        if encode:  # the front end's PNG, decoded as a client decodes it
            encoded = encode_images(images, "PNG", 100)
            images = np.stack([np.asarray(Image.open(io.BytesIO(image.data))) for image in encoded])
        np.testing.assert_array_equal(images, _reference_pngs(golden, case), err_msg=case["name"])

"""Image pre- and post-processing: sizes in multiples of 16, [-1, 1] tensors, output resize."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from serving.errors import InvalidArgumentError
from serving.pipeline import png

SIZE_MULTIPLE = 16  # VAE 8x downsampling, then 2x2 patches


def open_image(data: bytes, field: str, max_pixels: int, max_bytes: int | None = None) -> Image.Image:
    """Reads the header only (no pixels decoded): refuses empty, oversized and unidentifiable data."""
    if not data:
        raise InvalidArgumentError(field, "empty image")
    if max_bytes is not None and len(data) > max_bytes:
        raise InvalidArgumentError(field, f"{len(data)} bytes, the limit for one image is {max_bytes}")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        raise InvalidArgumentError(field, "not a decodable image (unknown or corrupt format)") from exc
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidArgumentError(field, f"not a decodable image ({exc})") from exc
    if image.width * image.height > max_pixels:
        raise InvalidArgumentError(
            field, f"{image.width}x{image.height} exceeds the {max_pixels}-pixel limit for input images"
        )
    return image


def decode_image(data: bytes, field: str, max_pixels: int, max_bytes: int | None = None) -> Image.Image:
    """Encoded bytes -> RGB image, refusing undecodable data and oversized images before decoding pixels."""
    image = open_image(data, field, max_pixels, max_bytes)
    if image.format == "PNG" and png.is_truncated(data):
        raise InvalidArgumentError(field, f"truncated: the header promises {image.width}x{image.height} pixels")
    try:
        image.load()  # the first frame of an animation
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidArgumentError(field, f"not a decodable image ({exc})") from exc
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any mode -> 8-bit RGB: CMYK, palette, grey and alpha as PIL converts them (alpha dropped, as the reference
    does); 16/32-bit integer grey scaled to 8 bits, where PIL's own conversion would clip nearly all of it to white."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I"):
        # float32 is exact for 16-bit values, and in place the peak is one copy (float64 temporaries: four).
        wide = np.array(image, dtype=np.float32)
        wide /= 257.0 if image.mode.startswith("I;16") or wide.max(initial=0) > 255 else 1.0
        np.clip(np.round(wide, out=wide), 0, 255, out=wide)
        image = Image.fromarray(wide.astype(np.uint8))
    return image.convert("RGB")


def fit_size(height: int, width: int, max_pixels: int, max_side: int | None = None) -> tuple[int, int]:
    """Scale (never up) to fit max_pixels and max_side keeping the aspect ratio, floor to multiples of 16."""
    ratio = min((max_pixels / (height * width)) ** 0.5, 1.0)
    if max_side is not None:
        ratio = min(ratio, max_side / height, max_side / width)
    return (
        int(height * ratio) // SIZE_MULTIPLE * SIZE_MULTIPLE,
        int(width * ratio) // SIZE_MULTIPLE * SIZE_MULTIPLE,
    )


def generation_size(
    width: int | None,
    height: int | None,
    max_pixels: int,
    ref_sizes: Sequence[tuple[int, int]],
    default: int = 1024,
) -> tuple[tuple[int, int], tuple[int, int]]:
    """((gen_height, gen_width), (out_height, out_width)) in pixels.

    One input image and no explicit size: the processed input's size. Otherwise the requested size
    (default 1024x1024), scaled down to max_pixels and floored to multiples of 16 for generation, and
    the output resized back to the requested size.
    """
    if len(ref_sizes) == 1 and width is None and height is None:
        return ref_sizes[0], ref_sizes[0]
    out_h, out_w = height or default, width or default
    ratio = min((max_pixels / (out_h * out_w)) ** 0.5, 1.0)
    # A side under 16 px is generated at 16 px and resized down; the other side then shrinks to stay in max_pixels.
    gen_h = max(_floor16(out_h * ratio), SIZE_MULTIPLE)
    gen_w = max(_floor16(min(out_w * ratio, max_pixels / gen_h)), SIZE_MULTIPLE)
    gen_h = max(_floor16(min(gen_h, max_pixels / gen_w)), SIZE_MULTIPLE)
    return (gen_h, gen_w), (out_h, out_w)


def _floor16(size: float) -> int:
    return int(size) // SIZE_MULTIPLE * SIZE_MULTIPLE


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float NHWC in [0, 1] -> uint8 NHWC (rounded): a quarter of the bytes, which is all an 8-bit format keeps."""
    return np.asarray((images * 255).round(), dtype=np.uint8)


def to_pil(images: np.ndarray) -> list[Image.Image]:
    """uint8 NHWC -> RGB images."""
    return [Image.fromarray(img) for img in images]

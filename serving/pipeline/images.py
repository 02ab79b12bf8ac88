"""Image pre- and post-processing: sizes in multiples of 16, [-1, 1] tensors, output resize.

Input images are taken as displayed: their EXIF orientation is applied when they are decoded, and the sizes read
from their headers (costs, budgets, size checks) are the oriented ones, so that both agree (a phone photo stored
sideways with orientation 6 is edited upright, as the reference does).
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence

import numpy as np
from PIL import ExifTags, Image, PngImagePlugin, UnidentifiedImageError

from serving.errors import InvalidArgumentError
from serving.pipeline import jpeg, png, tiff

SIZE_MULTIPLE = 16  # VAE 8x downsampling, then 2x2 patches
# The formats input images may have (docs/api.md): any other Pillow plugin is never tried, so EPS never reaches
# Ghostscript and rarely used parsers are out of reach. JPEG includes multi-picture (MPO) files: the first is read.
INPUT_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
# A PNG's text chunks are inflated as its header is read, before any check here sees them; Pillow's own bound, 64 MB
# in all, a 60 KB file reached (+57 MiB an image, in the front end and the model). The model reads no text: this
# keeps what real files carry (a ComfyUI workflow is tens of KB) and refuses the rest (Pillow's documented knob).
MAX_PNG_TEXT_BYTES = 8 * 1024 * 1024
PngImagePlugin.MAX_TEXT_MEMORY = MAX_PNG_TEXT_BYTES

# EXIF orientation -> the transpose that shows the stored pixels upright; 5-8 swap width and height.
_ORIENTATIONS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def open_image(data: bytes, field: str, max_pixels: int, max_bytes: int | None = None) -> Image.Image:
    """Reads the header only (no pixels decoded): refuses empty, oversized and unidentifiable data, formats outside
    INPUT_FORMATS, JPEGs that jpeg.refusal refuses (too many scans, markers or stray bytes) and TIFFs that
    tiff.refusal refuses (tiles larger than the image)."""
    if not data:
        raise InvalidArgumentError(field, "empty image")
    if max_bytes is not None and len(data) > max_bytes:
        raise InvalidArgumentError(field, f"{len(data)} bytes, the limit for one image is {max_bytes}")
    if data.startswith(jpeg.SIGNATURE) and (reason := jpeg.refusal(data)) is not None:
        raise InvalidArgumentError(field, reason)  # before Pillow's header parser, which is slower on such files
    image = _open(data)
    if isinstance(image, str):
        raise InvalidArgumentError(field, image)
    if image.width * image.height > max_pixels:
        raise InvalidArgumentError(
            field, f"{image.width}x{image.height} exceeds the {max_pixels}-pixel limit for input images"
        )
    if image.format == "TIFF" and (reason := tiff.refusal(image)) is not None:
        raise InvalidArgumentError(field, reason)
    if image.mode == "F":
        # Float samples have no agreed scale (0..1, 0..255, HDR): any conversion to 8 bits would be a guess.
        raise InvalidArgumentError(field, "floating-point (mode F) images are not supported: send 8 or 16-bit")
    return image


def orientation(image: Image.Image) -> int:
    """The EXIF orientation (1-8) as the header states it, 1 when absent or unreadable; no pixels are decoded."""
    if image.format == "PNG" and "exif" not in image.info:
        return 1  # an eXIf chunk after the pixel data: PIL would decode the image to find it; viewers ignore it too
    try:
        value = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # a damaged EXIF block is ignored, as viewers ignore it
        return 1
    return value if value in _ORIENTATIONS else 1


def oriented_size(image: Image.Image) -> tuple[int, int]:
    """(height, width) as displayed: the header's, swapped for orientations 5-8."""
    if orientation(image) >= 5:
        return image.width, image.height
    return image.height, image.width


def decode_image(data: bytes, field: str, max_pixels: int, max_bytes: int | None = None) -> Image.Image:
    """Encoded bytes -> RGB image as displayed (EXIF orientation applied), refusing undecodable data and oversized
    images before decoding pixels."""
    image = open_image(data, field, max_pixels, max_bytes)
    turn = _ORIENTATIONS.get(orientation(image))  # read before load(), as the front end read it
    if image.format == "PNG" and png.is_truncated(data):
        raise InvalidArgumentError(field, f"truncated: the header promises {image.width}x{image.height} pixels")
    if (failure := _load(image)) is not None:
        raise InvalidArgumentError(field, failure)
    rgb = to_rgb(image)
    return rgb.transpose(turn) if turn is not None else rgb


# Pillow's errors are turned into text, never chained to the InvalidArgumentError raised for them: their tracebacks
# hold the parser's and decoder's frames and, with them, buffers sized by the header (a TIFF's tile: 2.1 GB for a
# 169-byte file) for as long as the error lives, which in the model's asyncio futures was until a cyclic collection
# ran, or longer (a served model's memory grew by each refused file's tile).
_PILLOW_ERRORS = (OSError, ValueError, Image.DecompressionBombError)
# A codec's status number (libtiff's, zlib's), which says nothing to a caller.
_CODEC_STATUS = re.compile(r"(decoder|encoder) error -?[0-9]+")


def _open(data: bytes) -> Image.Image | str:
    """The image with its header read, or why it does not open."""
    try:
        return Image.open(io.BytesIO(data), formats=INPUT_FORMATS)
    except UnidentifiedImageError:
        return f"not a decodable image (unknown or corrupt format; accepted: {', '.join(INPUT_FORMATS)})"
    except _PILLOW_ERRORS as exc:
        return _undecodable(exc)


def _undecodable(error: Exception) -> str:
    """Why Pillow could not read an image, in the API's words where Pillow's are its internals: its
    decompression-bomb guard ("could be decompression bomb DOS attack") and a codec's status number."""
    if isinstance(error, Image.DecompressionBombError):
        limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
        return f"not a decodable image: its header states over {limit} pixels, far past the limit for input images"
    if _CODEC_STATUS.search(str(error)):
        return "not a decodable image: its compressed pixel data is corrupt"
    return f"not a decodable image ({error})"


def _load(image: Image.Image) -> str | None:
    """Decodes the pixels (the first frame of an animation); None, or why they do not decode, the image then
    closed (its pixels decoded so far freed: the caller's frame, held by the error it raises, keeps the image)."""
    try:
        image.load()
    except _PILLOW_ERRORS as exc:
        image.close()
        return _undecodable(exc)
    return None


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


def scaled_size(height: int, width: int, max_pixels: int, max_side: int | None = None) -> tuple[int, int]:
    """Scale (never up) to fit max_pixels and max_side keeping the aspect ratio."""
    ratio = min((max_pixels / (height * width)) ** 0.5, 1.0)
    if max_side is not None:
        ratio = min(ratio, max_side / height, max_side / width)
    return int(height * ratio), int(width * ratio)


def fit_size(height: int, width: int, max_pixels: int, max_side: int | None = None) -> tuple[int, int]:
    """scaled_size floored to multiples of 16."""
    scaled_h, scaled_w = scaled_size(height, width, max_pixels, max_side)
    return scaled_h // SIZE_MULTIPLE * SIZE_MULTIPLE, scaled_w // SIZE_MULTIPLE * SIZE_MULTIPLE


def model_size(height: int, width: int, max_pixels: int, max_side: int, field: str) -> tuple[int, int]:
    """fit_size of an input image; InvalidArgumentError naming `field` when a side of it is 0 (under 16 px). The
    front end checks the headers' sizes with this, the model the decoded images (the same sizes)."""
    fitted = fit_size(height, width, max_pixels, max_side)
    if 0 in fitted:
        # The limit is on the image as the model takes it: a long strip shrinks into max_side first.
        scaled_h, scaled_w = scaled_size(height, width, max_pixels, max_side)
        raise InvalidArgumentError(
            field,
            f"image of {width}x{height} is resized to {scaled_w}x{scaled_h} to fit max_pixels {max_pixels} and"
            f" max_input_image_side_length {max_side}, and both sides of the resized image must reach"
            f" {SIZE_MULTIPLE} px",
        )
    return fitted


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

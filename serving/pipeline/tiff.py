"""A TIFF's tiles, bounded by its image before any pixel is decoded.

Pillow decodes a compressed TIFF through libtiff one tile at a time, into a buffer of one tile that it allocates
before it reads a byte of data. The tile's size is a header field of its own (TileWidth x TileLength), unrelated to
the image's: a 169-byte 16x16 image declaring tiles of 26736x26736 made the decoder allocate 2.1 GB (and fail).

Strips need no bound (libtiff cuts RowsPerStrip to the image's height, and Pillow cuts the strips it reads itself),
nor do bit depths and sample counts: Pillow opens only the modes of its table (TiffImagePlugin.OPEN_INFO), at most 6
samples and 64 bits a pixel, and a tile's pixels have the image's samples.
"""

from __future__ import annotations

from PIL import Image
from PIL.TiffImagePlugin import TILELENGTH, TILEWIDTH

# Any tile up to 1024x1024 passes (writers use 256 or 512 squares, on images of any size); a larger one must fit the
# image, its sides rounded up to the multiple of 16 that the TIFF specification asks of tile sides.
MAX_TILE_PIXELS = 1024 * 1024
_TILE_SIDE_MULTIPLE = 16


def refusal(image: Image.Image) -> str | None:
    """Why a TIFF opened by Pillow (header read, nothing decoded) is refused for its tiles; None otherwise."""
    tags = getattr(image, "tag_v2", {})
    width, length = tags.get(TILEWIDTH, 0), tags.get(TILELENGTH, 0)
    allowed = max(MAX_TILE_PIXELS, _round_up(image.width) * _round_up(image.height))
    if width * length <= allowed:
        return None
    return (
        f"TIFF tiles of {width}x{length} pixels, more than the {image.width}x{image.height} image holds and than"
        f" {MAX_TILE_PIXELS} pixels (the decoder allocates a whole tile)"
    )


def _round_up(side: int) -> int:
    return -(-side // _TILE_SIDE_MULTIPLE) * _TILE_SIDE_MULTIPLE

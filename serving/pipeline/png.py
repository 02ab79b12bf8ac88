"""Whether a PNG carries every row its header promises.

Pillow fills the rows a PNG lacks with zeros and reports no error when the compressed stream ends cleanly before
the last row, so a 64-row header with 32 rows of data loads as an image half black. The check inflates the IDAT
stream once more, into a bounded buffer that is thrown away, and counts the bytes.
"""

from __future__ import annotations

import struct
import zlib

SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by colour type
ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
_CHUNK = 1 << 20


def _scanlines(width: int, height: int, bits_per_pixel: int) -> int:
    """Filtered bytes of a (sub)image: one filter byte, then the packed pixels, per row."""
    if width == 0 or height == 0:
        return 0
    return height * (1 + (width * bits_per_pixel + 7) // 8)


def expected_bytes(width: int, height: int, bit_depth: int, colour_type: int, interlaced: bool) -> int:
    bits = bit_depth * CHANNELS.get(colour_type, 4)
    if not interlaced:
        return _scanlines(width, height, bits)
    return sum(_scanlines((width - x0 + dx - 1) // dx, (height - y0 + dy - 1) // dy, bits) for x0, y0, dx, dy in ADAM7)


def is_truncated(data: bytes) -> bool:
    """True for a PNG whose image data inflates to fewer bytes than its header's size needs; False otherwise
    (not a PNG, or a PNG broken in some other way, is for the decoder to refuse)."""
    if not data.startswith(SIGNATURE) or len(data) < 33 or data[12:16] != b"IHDR":
        return False
    width, height, bit_depth, colour_type, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
    needed = expected_bytes(width, height, bit_depth, colour_type, interlace == 1)
    inflater = zlib.decompressobj()
    inflated, offset = 0, 8
    try:
        while offset + 8 <= len(data) and inflated < needed:
            length, kind = struct.unpack(">I4s", data[offset : offset + 8])
            body = data[offset + 8 : offset + 8 + length]
            offset += 12 + length
            if kind == b"IDAT":
                inflated += len(inflater.decompress(body, _CHUNK))
                while inflater.unconsumed_tail and inflated < needed:
                    inflated += len(inflater.decompress(inflater.unconsumed_tail, _CHUNK))
            elif kind == b"IEND":
                break
    except zlib.error:
        return False
    return inflated < needed

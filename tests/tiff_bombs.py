"""Hand-made TIFFs whose decoder buffer is out of proportion to their pixels: a tiny image declaring a huge tile
or strip (Pillow's libtiff decoder allocates one tile or strip before it reads a byte of data)."""

from __future__ import annotations

import math
import struct
import zlib

_SHORT, _LONG = 3, 4
DEFLATE = 8


def tiff(
    width: int,
    height: int,
    *,
    tile: tuple[int, int] | None = None,
    rows_per_strip: int | None = None,
    compression: int = DEFLATE,
    photometric: int = 2,
    bits: tuple[int, ...] = (8, 8, 8),
    block: bytes | None = None,
) -> bytes:
    """A little-endian one-page TIFF: tiled when `tile` (width, length) is given, else in strips of `rows_per_strip`
    rows (default: all). Every block holds zeros (deflated for DEFLATE); `block` replaces them by one block of those
    bytes, too short for a tile: the decoder fails after allocating its buffer (the attack's 169-byte file)."""
    block_w, block_h = tile or (width, rows_per_strip or height)
    if block is None:
        size = block_w * min(block_h, height) * sum(bits) // 8 if tile is None else block_w * block_h * sum(bits) // 8
        raw = bytes(size)
        count = math.ceil(width / block_w) * math.ceil(height / block_h)
        blocks = [zlib.compress(raw) if compression == DEFLATE else raw] * count
    else:
        blocks = [block]
    offset_tag, count_tag = (324, 325) if tile else (273, 279)
    layout = [
        (256, _LONG, [width]),
        (257, _LONG, [height]),
        (258, _SHORT, list(bits)),
        (259, _SHORT, [compression]),
        (262, _SHORT, [photometric]),
        (277, _SHORT, [len(bits)]),
        (284, _SHORT, [1]),
        *([(322, _LONG, [tile[0]]), (323, _LONG, [tile[1]])] if tile else [(278, _LONG, [block_h])]),
        (offset_tag, _LONG, [0] * len(blocks)),
        (count_tag, _LONG, [len(b) for b in blocks]),
    ]
    layout.sort()
    header_size = sum(map(len, _ifd(layout)))
    starts = [header_size + sum(len(b) for b in blocks[:i]) for i in range(len(blocks))]
    layout = [(tag, kind, starts if tag == offset_tag else values) for tag, kind, values in layout]
    ifd, out_of_line = _ifd(layout)
    return ifd + out_of_line + b"".join(blocks)


def _ifd(entries: list[tuple[int, int, list[int]]]) -> tuple[bytes, bytes]:
    """(header and IFD, the values that do not fit in their entries), the IFD at offset 8."""
    first_blob = 8 + 2 + 12 * len(entries) + 4
    fields, blobs = b"", b""
    for tag, kind, values in entries:
        packed = struct.pack("<" + ("H" if kind == _SHORT else "I") * len(values), *values)
        if len(packed) > 4:
            fields += struct.pack("<HHII", tag, kind, len(values), first_blob + len(blobs))
            blobs += packed
        else:
            fields += struct.pack("<HHI", tag, kind, len(values)) + packed.ljust(4, b"\0")
    return b"II*\0" + struct.pack("<IH", 8, len(entries)) + fields + struct.pack("<I", 0), blobs


# The attack's file (169 bytes): a 16x16 RGB image in 8192x8192 tiles, whose decoder allocated 192 MiB and failed.
TILE_BOMB = tiff(16, 16, tile=(8192, 8192), block=zlib.compress(bytes(1024)))

"""JPEGs whose decode work is out of proportion to their bytes: a progressive JPEG with its last scan repeated."""

from __future__ import annotations

import io

from PIL import Image

from serving.pipeline import jpeg


def segments(data: bytes) -> list[bytes]:
    """A plain JPEG's marker segments after SOI, each scan with its entropy-coded data, EOI last."""
    found, position = [], 2
    while data[position + 1] != 0xD9:
        end = position + 2 + int.from_bytes(data[position + 2 : position + 4], "big")
        if data[position + 1] == 0xDA:
            end = jpeg._MARKER.search(data, end).start()  # type: ignore[union-attr]
        found.append(data[position:end])
        position = end
    return [*found, data[position:]]


def scan_bomb(scans: int, side: int = 256) -> bytes:
    """A flat grey progressive JPEG whose last scan is repeated until it has `scans` scans (59 bytes each)."""
    out = io.BytesIO()
    Image.new("L", (side, side), 128).save(out, format="JPEG", progressive=True)
    parts = segments(out.getvalue())
    sos = [s for s in parts if s[1] == 0xDA]
    return jpeg.SIGNATURE + b"".join(parts[:-1]) + sos[-1] * (scans - len(sos)) + parts[-1]

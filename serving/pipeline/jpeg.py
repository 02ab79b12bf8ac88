"""How many scans a JPEG holds, counted without decoding it.

Each scan of a progressive JPEG is a pass over every block of the image, so the decode work is scans x pixels, and
a scan can be a few dozen bytes: a 260 KB 6000x6000 JPEG whose last scan is repeated 2000 times decodes for a minute.
Normal progressive JPEGs have about 10 scans (libjpeg's default script: 10 for colour, 6 for grey); the limit keeps
a wide margin for other encoders' scripts and bounds a 40-megapixel image's decode to a few seconds.
"""

from __future__ import annotations

import re

MAX_SCANS = 100
SIGNATURE = b"\xff\xd8"
_SOS, _EOI = 0xDA, 0xD9
_STANDALONE = (0x01, 0xD8)  # TEM, SOI: no length field (restart markers are skipped by _MARKER itself)
# A marker: 0xFF then a code that is not a stuffed zero, a restart marker (both occur inside entropy-coded data)
# or another 0xFF (fill). Searching for the next one skips garbage between segments too, as libjpeg does.
_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


def scan_count(data: bytes, stop_after: int = MAX_SCANS) -> int:
    """The start-of-scan markers up to the end-of-image marker, counting no further than stop_after + 1; 0 for
    data that is not a JPEG. Segments are skipped by their length and a scan's entropy-coded data to the next marker,
    so JPEGs embedded in metadata (EXIF thumbnails) are not counted."""
    if not data.startswith(SIGNATURE):
        return 0
    count, position = 0, len(SIGNATURE)
    while count <= stop_after and (found := _MARKER.search(data, position)) is not None:
        code = data[found.start() + 1]
        if code == _EOI:
            break
        position = found.end()
        if code in _STANDALONE:
            continue
        position += int.from_bytes(data[position : position + 2], "big")  # the length counts its own two bytes
        count += code == _SOS
    return count

"""How many scans a JPEG holds, counted without decoding it, and why one is refused before decoding.

Each scan of a progressive JPEG is a pass over every block of the image, so the decode work is scans x pixels, and
a scan can be a few dozen bytes: a 260 KB 6000x6000 JPEG whose last scan is repeated 2000 times decodes for a minute.
Normal progressive JPEGs have about 10 scans (libjpeg's default script: 10 for colour, 6 for grey); the limit keeps
a wide margin for other encoders' scripts and bounds a 40-megapixel image's decode to a few seconds.

The walk itself must stay cheap: it runs on every JPEG in the front end and again in the decoder. Entropy-coded
data, stuffed bytes, restart markers and fill bytes are skipped by one regex search (C speed, whatever their number);
each other marker is a step in Python, so the walk stops after MAX_MARKERS of them and the file is refused. Real files
have tens (a 100-scan file with a Huffman table per scan about 250); 20 MiB of two-byte TEM markers has 10 million.
"""

from __future__ import annotations

import re

MAX_SCANS = 100
MAX_MARKERS = 1000  # markers other than RST0-7; 1000 full-size metadata segments would be 64 MB
SIGNATURE = b"\xff\xd8"
_SOS, _EOI = 0xDA, 0xD9
_STANDALONE = (0x01, 0xD8)  # TEM, SOI: no length field (restart markers are skipped by _MARKER itself)
# A marker: 0xFF then a code that is not a stuffed zero, a restart marker (both occur inside entropy-coded data)
# or another 0xFF (fill). Searching for the next one skips garbage between segments too, as libjpeg does.
_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


def walk(data: bytes, max_scans: int = MAX_SCANS, max_markers: int = MAX_MARKERS) -> tuple[int, int]:
    """(scans, markers): the start-of-scan markers and all markers walked up to the end-of-image marker, (0, 0) for
    data that is not a JPEG. The walk stops once scans pass max_scans or markers pass max_markers, so it takes at
    most max_markers + 1 steps. Segments are skipped by their length and a scan's entropy-coded data to the next
    marker, so JPEGs embedded in metadata (EXIF thumbnails) are not counted."""
    if not data.startswith(SIGNATURE):
        return 0, 0
    scans = markers = 0
    position = len(SIGNATURE)
    while scans <= max_scans and markers <= max_markers and (found := _MARKER.search(data, position)) is not None:
        code = data[found.start() + 1]
        if code == _EOI:
            break
        markers += 1
        position = found.end()
        if code in _STANDALONE:
            continue
        position += int.from_bytes(data[position : position + 2], "big")  # the length counts its own two bytes
        scans += code == _SOS
    return scans, markers


def refusal(data: bytes) -> str | None:
    """Why this JPEG is refused before decoding (too many scans, too many markers to walk), None when it is not."""
    scans, markers = walk(data)
    if scans > MAX_SCANS:
        # Each scan is a pass over every pixel: decode time grows with the scans, not with the bytes.
        return f"a JPEG with more than {MAX_SCANS} scans (progressive passes)"
    if markers > MAX_MARKERS:
        return f"a JPEG with more than {MAX_MARKERS} markers (segments); real files have tens"
    return None

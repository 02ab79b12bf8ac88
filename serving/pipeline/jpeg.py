"""How many scans a JPEG holds, counted without decoding it, and why one is refused before decoding.

Each scan of a progressive JPEG is a pass over every block of the image, so the decode work is scans x pixels, and
a scan can be a few dozen bytes: a 260 KB 6000x6000 JPEG whose last scan is repeated 2000 times decodes for a minute.
Normal progressive JPEGs have about 10 scans (libjpeg's default script: 10 for colour, 6 for grey); the limit keeps
a wide margin for other encoders' scripts and bounds a 40-megapixel image's decode to a few seconds.

The walk itself must stay cheap: it runs on every JPEG in the front end and again in the decoder. Entropy-coded
data, stuffed bytes, restart markers and fill bytes are skipped by one regex search (C speed, whatever their number);
each other marker is a step in Python, so the walk stops after MAX_MARKERS of them and the file is refused. Real files
have tens (a 100-scan file with a Huffman table per scan about 250); 20 MiB of two-byte TEM markers has 10 million.
It runs before Pillow reads the header, whose parser takes each segment up to the first scan, and each stray byte
between them, in Python (a million empty APP1 segments: 1.1 s; 20 MB of fill bytes: 5 s): MAX_STRAY bounds the latter.
"""

from __future__ import annotations

import re

MAX_SCANS = 100
MAX_MARKERS = 1000  # markers other than RST0-7; 1000 full-size metadata segments would be 64 MB
MAX_STRAY = 65536  # bytes between segments before the first scan (fill bytes, garbage); real files have none
SIGNATURE = b"\xff\xd8"
_SOS, _EOI = 0xDA, 0xD9
_STANDALONE = (0x01, 0xD8)  # TEM, SOI: no length field (restart markers are skipped by _MARKER itself)
# A marker: 0xFF then a code that is not a stuffed zero, a restart marker (both occur inside entropy-coded data)
# or another 0xFF (fill). Searching for the next one skips garbage between segments too, as libjpeg does.
_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


def walk(
    data: bytes, max_scans: int = MAX_SCANS, max_markers: int = MAX_MARKERS, max_stray: int = MAX_STRAY
) -> tuple[int, int, int]:
    """(scans, markers, stray): the start-of-scan markers and all markers walked up to the end-of-image marker, and
    the bytes skipped between segments before the first scan; (0, 0, 0) for data that is not a JPEG. The walk stops
    once scans pass max_scans, markers max_markers or stray max_stray (searching no further than that), so it takes
    at most max_markers + 1 steps. Segments are skipped by their length and a scan's entropy-coded data to the next
    marker, so JPEGs embedded in metadata (EXIF thumbnails) are not counted."""
    if not data.startswith(SIGNATURE):
        return 0, 0, 0
    scans = markers = stray = 0
    position = len(SIGNATURE)
    while scans <= max_scans and markers <= max_markers and stray <= max_stray:
        # Before the first scan the gap to the next marker is stray bytes: a marker is looked for only as far as the
        # limit allows (20 MB of fill bytes: 0.18 s of searching otherwise).
        end = min(position + max_stray - stray + 2, len(data)) if scans == 0 else len(data)  # + the marker
        found = _MARKER.search(data, position, end)
        if scans == 0:  # up to the search's end when no marker follows: Pillow reads that far too
            stray += max((found.start() if found else end) - position, 0)
        if found is None or (code := data[found.start() + 1]) == _EOI:
            break
        markers += 1
        position = found.end()
        if code in _STANDALONE:
            continue
        position += int.from_bytes(data[position : position + 2], "big")  # the length counts its own two bytes
        scans += code == _SOS
    return scans, markers, stray


def refusal(data: bytes) -> str | None:
    """Why this JPEG is refused before decoding (too many scans, too many markers or stray bytes to walk), None when it
    is not."""
    scans, markers, stray = walk(data)
    if scans > MAX_SCANS:
        # Each scan is a pass over every pixel: decode time grows with the scans, not with the bytes.
        return f"a JPEG with more than {MAX_SCANS} scans (progressive passes)"
    if markers > MAX_MARKERS:
        return f"a JPEG with more than {MAX_MARKERS} markers (segments); real files have tens"
    if stray > MAX_STRAY:
        return f"a JPEG with more than {MAX_STRAY} bytes between its header segments (fill bytes or garbage)"
    return None

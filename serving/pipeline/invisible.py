"""Characters that show nothing: what a blank prompt may consist of, and what the prompt policy looks through.

Category Cf (zero-width space, soft hyphen, BOM) is not all of them: combining grapheme joiner and variation
selectors are marks (Mn), the Hangul fillers letters (Lo), the braille blank a symbol (So), NUL a control (Cc).
And Cf is all of them but a few: every format character is invisible here except the prepended concatenation marks
(U+0600-0605, U+06DD, U+070F, U+0890-0891, U+08E2, U+110BD, U+110CD: the Arabic number sign, end of ayah and their
kin show a sign), as tests/test_invisible.py checks against unicodedata.
These sets are used to check and match text only; the prompt the model reads is never changed.
"""

from __future__ import annotations

import re
import unicodedata

# Default_Ignorable_Code_Point, from Unicode 16.0 DerivedCoreProperties.txt (tests/test_invisible.py compares it with
# the `regex` package's table where that is installed): inclusive ranges, unassigned code points of them included.
DEFAULT_IGNORABLE = (
    (0x00AD, 0x00AD),  # soft hyphen
    (0x034F, 0x034F),  # combining grapheme joiner
    (0x061C, 0x061C),  # Arabic letter mark
    (0x115F, 0x1160),  # Hangul choseong and jungseong fillers
    (0x17B4, 0x17B5),  # Khmer inherent vowels
    (0x180B, 0x180F),  # Mongolian free variation selectors, vowel separator
    (0x200B, 0x200F),  # zero-width space, non-joiner, joiner; left-to-right, right-to-left marks
    (0x202A, 0x202E),  # bidirectional embeddings and overrides
    (0x2060, 0x206F),  # word joiner, invisible operators, bidirectional isolates, deprecated format characters
    (0x3164, 0x3164),  # Hangul filler
    (0xFE00, 0xFE0F),  # variation selectors
    (0xFEFF, 0xFEFF),  # zero-width no-break space (BOM)
    (0xFFA0, 0xFFA0),  # halfwidth Hangul filler
    (0xFFF0, 0xFFF8),  # unassigned
    (0x1BCA0, 0x1BCA3),  # shorthand format controls
    (0x1D173, 0x1D17A),  # musical symbol beams, ties, slurs, phrases
    (0xE0000, 0xE0FFF),  # tags, variation selectors 17-256, unassigned
)
# Blank characters with a width: they read as a space, not as nothing (U+2800 is the braille pattern with no dots).
WIDE_BLANKS = "\u115f\u1160\u3164\uffa0\u2800"
# Format characters (Cf) outside DEFAULT_IGNORABLE that show nothing themselves (Unicode 16.0): the interlinear
# annotation characters and the Egyptian hieroglyph format controls (joiners, inserts, overlays, segments).
FORMAT_CONTROLS = ((0xFFF9, 0xFFFB), (0x13430, 0x1343F))
# C0 and C1 controls that are not white space (tab, line feed, ... U+001C-001F and U+0085 are).
CONTROLS = ((0x00, 0x08), (0x0E, 0x1B), (0x7F, 0x84), (0x86, 0x9F))
# What a run of invisible characters becomes in the policy's normal form: itself default-ignorable, so that form
# is stable when normalised again.
MARK = "\u2063"  # invisible separator


def _char_class(ranges: tuple[tuple[int, int], ...]) -> str:
    return "".join(re.escape(chr(low)) + (f"-{re.escape(chr(high))}" if high > low else "") for low, high in ranges)


_WIDE = re.compile(f"[{WIDE_BLANKS}]")
_INVISIBLE = _char_class(DEFAULT_IGNORABLE + FORMAT_CONTROLS + CONTROLS)
_INVISIBLE_RUN = re.compile(f"[{_INVISIBLE}]+")
_SHOWS_NOTHING = re.compile(f"[\\s{WIDE_BLANKS}{_INVISIBLE}]+")


def is_blank(text: str) -> bool:
    """True when nothing in `text` shows: white space, default-ignorable, format and control characters, blanks such
    as the Hangul filler, and combining marks with nothing to combine with."""
    return all(unicodedata.category(char) in ("Mn", "Me") for char in _SHOWS_NOTHING.sub("", text))


def mark_invisible(text: str) -> str:
    """Wide blanks as spaces, each run of other invisible characters as one MARK: whether such a run stands for
    nothing ("pi<ZWSP>pe") or for a space ("pipe<NUL>bomb") is for the reader of this form to try."""
    return _INVISIBLE_RUN.sub(MARK, _WIDE.sub(" ", text))

"""The characters that show nothing: the data against Unicode's, the blank check, the policy's marking."""

from __future__ import annotations

import unicodedata

import pytest

from serving.pipeline.invisible import DEFAULT_IGNORABLE, FORMAT_CONTROLS, MARK, is_blank, mark_invisible

# The format characters (Cf) that show a sign, deliberately not invisible: the prepended concatenation marks (Arabic
# number sign, end of ayah, Syriac abbreviation mark, Kaithi number signs...).
VISIBLE_FORMAT = {*range(0x0600, 0x0606), 0x06DD, 0x070F, 0x0890, 0x0891, 0x08E2, 0x110BD, 0x110CD}


def test_default_ignorable_ranges_are_unicodes() -> None:
    regex = pytest.importorskip("regex")  # its tables follow the Unicode release it was built with
    listed = {code for low, high in DEFAULT_IGNORABLE for code in range(low, high + 1)}
    derived = {code for code in range(0x110000) if regex.match(r"\p{Default_Ignorable_Code_Point}", chr(code))}
    assert listed == derived


def test_every_format_character_is_invisible_or_listed_as_visible() -> None:
    """The old rule dropped all of category Cf: each one is still read as invisible, unless it shows a sign."""
    format_characters = {code for code in range(0x110000) if unicodedata.category(chr(code)) == "Cf"}
    assert {code for code in format_characters if mark_invisible(chr(code)) != MARK} == VISIBLE_FORMAT
    assert all(is_blank(chr(code)) != (code in VISIBLE_FORMAT) for code in format_characters)


def test_format_controls_are_unicodes() -> None:
    regex = pytest.importorskip("regex")  # Unicode 16 or later; Python 3.11's unicodedata is 14.0
    listed = {code for low, high in DEFAULT_IGNORABLE + FORMAT_CONTROLS for code in range(low, high + 1)}
    everything = "".join(map(chr, range(0x110000)))
    format_characters = {ord(char) for char in regex.findall(r"\p{Cf}", everything)}
    visible = {ord(char) for char in regex.findall(r"\p{Prepended_Concatenation_Mark}", everything)}
    assert visible == VISIBLE_FORMAT
    assert format_characters - listed == VISIBLE_FORMAT


@pytest.mark.parametrize(
    "text",
    [
        "",
        " \n",
        "\u3164\u3164",
        "\u2800",
        "\u034f",
        "\u115f\u1160",
        "\ufe0f",
        "\x00\x7f",
        "\u0301",
        "\ufffb",
        "\U00013430",
    ],
)
def test_blank(text: str) -> None:
    assert is_blank(text)


@pytest.mark.parametrize("text", ["a", "\u3164a", "e\u0301", ".", "\u0600"])
def test_not_blank(text: str) -> None:
    assert not is_blank(text)


def test_marking() -> None:
    assert mark_invisible("pi\u200b\u200cpe\x00bomb\u3164\u2800x") == f"pi{MARK}pe{MARK}bomb  x"
    assert mark_invisible("a\tb\nc\u0085d") == "a\tb\nc\u0085d"  # white-space controls are white space
    assert mark_invisible("pi\U00013430pe\U0001343fbomb") == f"pi{MARK}pe{MARK}bomb"  # Egyptian format controls

"""The characters that show nothing: the data against Unicode's, the blank check, the policy's marking."""

from __future__ import annotations

import pytest

from serving.pipeline.invisible import DEFAULT_IGNORABLE, MARK, is_blank, mark_invisible


def test_default_ignorable_ranges_are_unicodes() -> None:
    regex = pytest.importorskip("regex")  # its tables follow the Unicode release it was built with
    listed = {code for low, high in DEFAULT_IGNORABLE for code in range(low, high + 1)}
    derived = {code for code in range(0x110000) if regex.match(r"\p{Default_Ignorable_Code_Point}", chr(code))}
    assert listed == derived


@pytest.mark.parametrize(
    "text", ["", " \n", "\u3164\u3164", "\u2800", "\u034f", "\u115f\u1160", "\ufe0f", "\x00\x7f", "\u0301", "\ufffb"]
)
def test_blank(text: str) -> None:
    assert is_blank(text)


@pytest.mark.parametrize("text", ["a", "\u3164a", "e\u0301", ".", "\u0600"])
def test_not_blank(text: str) -> None:
    assert not is_blank(text)


def test_marking() -> None:
    assert mark_invisible("pi\u200b\u200cpe\x00bomb\u3164\u2800x") == f"pi{MARK}pe{MARK}bomb  x"
    assert mark_invisible("a\tb\nc\u0085d") == "a\tb\nc\u0085d"  # white-space controls are white space

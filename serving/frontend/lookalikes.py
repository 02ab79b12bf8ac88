"""Letters that look like Latin letters or digits, and how the prompt policy reads them: "bomb" spelled with a
Cyrillic o (U+043E) reads as "bomb".

The classes of characters that look alike are Unicode's confusables (UTS #39, confusables.txt) as the
confusable_homoglyphs package ships them: pairs of a character and the prototype it is confused with, joined here
into classes (each class of confusables.txt is its prototype and the characters that map to it). A word character
that is not ASCII reads as the ASCII letter or digit in its class, in its own case (a letter with no case, such as
Lisu's, as the member is); a letter before a digit, one of its own case first (Greek capital iota, in the class of
l, I and 1, reads as I). So Cyrillic, Greek, Cherokee, Lisu, ... lookalikes fold (347 characters); full-width and
mathematical letters are NFKC's (normalise in policy.py), before this. Case is as UTS #39 has it: "BOMB" in
Cyrillic capitals (U+0412 U+041E U+041C U+0412) reads as "BOMB", their small letters do not (U+0432 looks like a
small capital B, not like b), so lower-case Cyrillic and Greek words fold only where each letter looks like a Latin
one.

Deliberately left alone:
- ASCII. Unicode also puts m with rn, I with l and 1, O with 0; folding those would read "modern" as "modem".
- Characters that are not word characters (|, U+2223 divides, ...), and nothing folds into a non-word character:
  the folded text has its words where the text had them, so a term still matches whole words only, never part of a
  folded word.
- Letters with marks (ó, a Cyrillic o with U+0301): UTS #39 keeps them apart from the bare letter too.
- Characters with no ASCII letter or digit in their class (Cyrillic л, Greek λ, CJK).
- Right-to-left letters: the package's data lacks those lines of confusables.txt. Against ICU 77.1's UTS #39
  skeletons these 16 are all the difference (Hebrew vav, tet, final nun, samekh; Arabic alef, heh and its forms, ae;
  Arabic-Indic 1, 5, 7; NKo 0 and a; Mende Kikakui 1 and 5): "bomb" with a samekh (U+05E1) is not folded, and
  ordinary Hebrew and Arabic text reads as it is.

Digits are read by what they mean, not by what they look like: a decimal digit of any script (category Nd) reads as
its own value's ASCII digit, whether or not it is a confusable (580 of them). Their lookalikes are other numbers or
letters: Bengali four looks like 8, Gurmukhi one like 9, Devanagari zero like o, Persian seven like V, so folding by
looks refused the ordinary Bengali "44 people" under a rule "88". By value, "1488" written in Bengali or Persian
digits is that rule's number, as it should be. Other numerals are not folded (Bamum koghom, zero, looks like 2;
Old Italic and Warang Citi numerals and the ideographic zero look like letters). Letters that look like digits
(Cyrillic small be like 6, capital ze like 3, Latin ou like 8) fold to them, as in UTS #39, so "14" with two Latin
ou reads as "1488"; only a word made wholly of such letters reads as a number (the Russian particle be, U+0431, as
"6").
"""

from __future__ import annotations

import re
import string
import sys
import unicodedata
from functools import cache

from confusable_homoglyphs import confusables

_WORD = re.compile(r"\w")


def _class_roots() -> dict[str, str]:
    """Each character or sequence of the confusables data, to one member of its class (union-find)."""
    parent: dict[str, str] = {}

    def root(item: str) -> str:
        parent.setdefault(item, item)
        while parent[item] != item:
            parent[item] = parent[parent[item]]
            item = parent[item]
        return item

    for item, lookalikes in confusables.confusables_data.items():
        for lookalike in lookalikes:
            parent[root(item)] = root(lookalike["c"])
    return {item: root(item) for item in parent}


def _as_ascii(members: list[str], char: str) -> str:
    """The ASCII member of its class `char` reads as: a letter of its case, else any letter, else a digit; in its
    case, where it has one."""
    letters = [m for m in members if m.isalpha()]
    chosen = ([m for m in letters if m.isupper() == char.isupper()] or letters or members)[0]
    return chosen.upper() if char.isupper() else chosen.lower() if char.islower() else chosen


@cache
def lookalike_table() -> dict[int, str]:
    """str.translate's table: each folded character (927 of them) to its ASCII letter or digit."""
    roots = _class_roots()
    ascii_members: dict[str, list[str]] = {}
    for char in string.ascii_letters + string.digits:
        if char in roots:
            ascii_members.setdefault(roots[char], []).append(char)
    table = {}
    for char in roots:
        if len(char) != 1 or char.isascii() or not _WORD.match(char) or unicodedata.normalize("NFKC", char) != char:
            continue  # NFKC comes first: a character it changes is never read here
        if unicodedata.numeric(char, None) is not None:
            continue  # a digit reads as its value (below), another numeral as it is
        if members := ascii_members.get(roots[char]):
            table[ord(char)] = _as_ascii(members, char)
    return table | _digit_values()


def _digit_values() -> dict[int, str]:
    """Each decimal digit that is not ASCII and that NFKC keeps (Bengali four, U+09EA) to its value's ASCII digit."""
    digits = (chr(code) for code in range(0x80, sys.maxunicode + 1))
    return {
        ord(char): str(unicodedata.decimal(char))
        for char in digits
        if char.isdecimal() and unicodedata.normalize("NFKC", char) == char
    }


def fold_lookalikes(text: str) -> str:
    """`text` (NFKC-normalised) with each lookalike letter as the ASCII one it looks like; as long as `text`."""
    return text.translate(lookalike_table())

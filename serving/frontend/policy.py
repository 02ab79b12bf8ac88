"""The operator's prompt policy: rules checked in the front end before a request reaches Triton, and on answers.

The policy file (`--policy`, JSON, or YAML when it ends in .yaml / .yml) holds rules with ids and per-token
overrides, the tokens named as in the `--auth-tokens` file (serving/frontend/auth.py):

    {"rules": [{"id": "weapons", "terms": ["pipe bomb", "nerve agent"]},
               {"id": "card-number", "regexes": ["\\b(?:\\d[ -]?){13,16}\\b"]}],
     "overrides": {"red-team": {"exempt": ["weapons"]}, "kids-app": {"rules": [{"id": "gore", "terms": ["gore"]}]}}}

A term matches case-insensitively, as whole words (Unicode-normalised: NFKC, so full-width letters do not slip
through; spaces in a term match any run of white space); a regular expression is Python `re` syntax, applied to the
normalised text as written (`(?i)` makes it case-insensitive). Characters that show nothing
(serving/pipeline/invisible.py: default-ignorable ones such as zero-width spaces, soft hyphens, variation selectors,
the combining grapheme joiner; format characters; controls such as NUL) may stand for nothing or for a space; blanks
with a width (Hangul fillers, the braille blank) are spaces. A term matches with each run of them read either way,
independently ("pi<ZWSP>pe<NUL>bomb" matches "pipe bomb"). A regular expression is tried on a few readings
(`regex_readings`): every run as nothing; every run as a space; runs between two word characters as nothing and the
others as spaces; and, for each run between two word characters, that run alone read the other way in the last two
(checked in a window of REGEX_WINDOW characters either side of it, where `^` and `$` mean the window's edges). So a
match is found when at most one run between word characters must be read differently from the rest of them: any
number of words split and one space hidden, or the reverse; a match that needs two of each is not guaranteed. Only
the first REGEX_RUNS runs between word characters get readings of their own, so the one run read the other way must
be among them; past them, a match is found when every run reads one way, or those between word characters as
nothing and the others as spaces. Terms have no such limit. (8190 characters of random letter pairs each followed by
a zero-width space made 5461 readings, 712K characters: 2.0 s for a prompt and negative prompt at 100 regex rules;
now 515 readings, 83K characters, 0.24 s. Such text is not refused: Thai puts U+200B between words.)
Letters that look like Latin ones (serving/frontend/lookalikes.py, from Unicode's confusables: "bomb" with a
Cyrillic o (U+043E), Greek omicron, Cherokee or Lisu letters; full-width and mathematical letters are NFKC's) are
read as those too: a term matches the text, or the text with them folded (the term folded the same way, so a term
in Cyrillic still matches Cyrillic text); a regular expression is tried on the folded text's readings as well, since
a regex is as easily spelled round as a term and no policy should have to list every script's "o" in it. That at
most doubles the readings (`policy_readings`: REGEX_RUNS bounds both halves). Folding keeps every word where it was
and leaves ASCII as it is, so a term still matches whole words only; a text that folding leaves unchanged (no
lookalike letter, no digit of another script: those read as their own value) is read once.
`exempt` lists rule ids the token skips ("*": all of the file's rules); an override's `rules` apply to that token
only. Prompts, negative prompts, chat text and Understand answers are checked (a streamed answer delta by delta,
in a bounded window: `AnswerScan`). A refusal names the rule's id and the field, never the matched text.
SIGHUP re-reads the file; a file that does not load leaves the policy in force as it was (and is logged).
"""

from __future__ import annotations

import json
import logging
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import grpc
import yaml
from google.rpc import error_details_pb2
from omnigen2.v1 import omnigen2_pb2 as pb

from serving.errors import SettingError
from serving.frontend.lookalikes import fold_lookalikes
from serving.frontend.status import ApiError, make_status
from serving.pipeline.invisible import MARK, mark_invisible

log = logging.getLogger(__name__)
ERROR_DOMAIN = "policy.omnigen2.v1"
_RULE_KEYS = {"id", "terms", "regexes"}
_OVERRIDE_KEYS = {"exempt", "rules"}


@dataclass(frozen=True)
class Rule:
    id: str
    terms: tuple[re.Pattern[str], ...]  # lookalike letters folded; each run of invisible characters (MARK) read as
    # nothing or a space
    regexes: tuple[re.Pattern[str], ...]
    # The terms that are not ASCII, as written (a small letter may not fold where its capital does). An ASCII term
    # needs no such pattern: it finds in the folded text whatever it would find in the text (folding keeps ASCII and
    # word boundaries, and a folded letter that matches an ASCII one ignoring case, the dotless i, folds to that
    # letter: tests/test_lookalikes.py).
    written_terms: tuple[re.Pattern[str], ...]

    def matches(self, text: str, folded: str, readings: Sequence[str]) -> bool:
        """Whether the normalised `text` matches a term as written, its `folded` form (`fold_lookalikes`) a term,
        or one of `readings` (`policy_readings`) a regular expression."""
        if any(pattern.search(folded) for pattern in self.terms):
            return True
        if any(pattern.search(text) for pattern in self.written_terms):
            return True
        return any(pattern.search(reading) for pattern in self.regexes for reading in readings)


@dataclass(frozen=True)
class Override:
    exempt: frozenset[str] = frozenset()  # rule ids, or "*"
    rules: tuple[Rule, ...] = ()


@dataclass(frozen=True)
class Violation:
    rule: str
    field: str

    def error(self, what: str = "request") -> ApiError:
        """PERMISSION_DENIED with a google.rpc.ErrorInfo whose reason is the rule's id."""
        info = error_details_pb2.ErrorInfo(reason=self.rule, domain=ERROR_DOMAIN, metadata={"field": self.field})
        message = f"the {what} is refused by the content policy (rule {self.rule!r}, field {self.field})"
        return ApiError(make_status(grpc.StatusCode.PERMISSION_DENIED, message, info))


def normalise(text: str) -> str:
    """Each run of characters that show nothing (U+200B, U+034F, NUL, ...) as one MARK, blanks with a width (U+3164,
    U+2800) as spaces, then NFKC (which makes none of them)."""
    return unicodedata.normalize("NFKC", mark_invisible(text))


REGEX_WINDOW = 64  # characters either side of a run read apart from the others: a policy regex's match is shorter
REGEX_RUNS = 256  # runs between word characters read apart from the others: the check's cost stays bounded
_WORD = re.compile(r"\w")
_NON_WORD_BEFORE = re.compile(r"\W")
_TO_LAST_NON_WORD = re.compile(r".*\W", re.DOTALL)


def _joined(parts: list[str], separators: list[str]) -> tuple[str, list[int]]:
    """The parts with separators between them, and where each separator starts."""
    pieces, starts, length = [parts[0]], [], len(parts[0])
    for separator, part in zip(separators, parts[1:], strict=True):
        starts.append(length)
        pieces += (separator, part)
        length += len(separator) + len(part)
    return "".join(pieces), starts


def _window(text: str, start: int, end: int, replacement: str) -> str:
    """text[start:end] replaced, with up to REGEX_WINDOW characters either side, cut at non-word characters where
    there are some (so that a cut word's tail does not read as a whole word)."""
    low, high = max(start - REGEX_WINDOW, 0), min(end + REGEX_WINDOW, len(text))
    if low > 0 and (cut := _NON_WORD_BEFORE.search(text, low, start)) is not None:
        low = cut.start()
    if high < len(text) and (last := _TO_LAST_NON_WORD.match(text, end, high)) is not None:
        high = last.end()
    return text[low:start] + replacement + text[end:high]


def regex_readings(text: str) -> list[str]:
    """The normalised `text` as regular expressions read it (the module's docstring): 3 + 2 x (runs between word
    characters, at most REGEX_RUNS) strings, those past the first three at most 2 x REGEX_WINDOW + 1 characters
    long."""
    if MARK not in text:
        return [text]
    parts = text.split(MARK)  # normalise made each run one MARK
    inside = [bool(_WORD.match(left[-1:]) and _WORD.match(right)) for left, right in pairwise(parts)]
    words, word_starts = _joined(parts, ["" if within else " " for within in inside])
    spaced, space_starts = _joined(parts, [" "] * len(inside))
    readings = ["".join(parts), spaced, words]
    for run in [run for run, within in enumerate(inside) if within][:REGEX_RUNS]:
        readings.append(_window(words, word_starts[run], word_starts[run], " "))
        readings.append(_window(spaced, space_starts[run], space_starts[run] + 1, ""))
    return list(dict.fromkeys(readings))


def policy_readings(text: str, folded: str) -> list[str]:
    """What regular expressions read: the `regex_readings` of the normalised `text` and, where it differs, of its
    `folded` form; at most 2 x (3 + 2 x REGEX_RUNS) strings. Folding keeps every character's place and which
    characters are word characters, so the folded readings are the readings folded (the same strings in the same
    order; reading the folded text anew slices what is folded once, where folding each reading translated its
    windows one by one: 24-27 ms against 36-39 ms for 8190 characters of lookalike pairs, 1030 readings)."""
    readings = regex_readings(text)
    return readings if folded == text else list(dict.fromkeys(readings + regex_readings(folded)))


def _term_pattern(normalised: str) -> re.Pattern[str]:
    """Whole words, each run of white space or MARK between them; a MARK may also stand between two letters."""
    words = normalised.replace(MARK, "").split()
    spelled = (f"{MARK}?".join(re.escape(char) for char in word) for word in words)
    return re.compile(r"(?<!\w)" + rf"(?:\s|{MARK})+".join(spelled) + r"(?!\w)", re.IGNORECASE)


def _term_patterns(term: str, rule_id: str) -> tuple[re.Pattern[str], re.Pattern[str] | None]:
    """The pattern of the term with its lookalike letters folded, and of the term as written unless it is ASCII."""
    normalised = normalise(term)
    if not normalised.replace(MARK, "").split():
        raise SettingError("--policy", f"rule {rule_id!r}: a term with nothing visible in it ({term!r})")
    written = None if normalised.replace(MARK, "").isascii() else _term_pattern(normalised)
    return _term_pattern(fold_lookalikes(normalised)), written


def _strings(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise SettingError("--policy", f"{where}: a list of non-empty strings")
    return value


def _rule(entry: Any, where: str) -> Rule:
    if not isinstance(entry, dict) or not isinstance(entry.get("id"), str) or not entry["id"]:
        raise SettingError("--policy", f"{where}: a rule is an object with a non-empty string `id`")
    rule_id = entry["id"]
    if unknown := set(entry) - _RULE_KEYS:
        raise SettingError("--policy", f"rule {rule_id!r}: unknown keys {sorted(unknown)}")
    terms = [_term_patterns(t, rule_id) for t in _strings(entry.get("terms", []), f"rule {rule_id!r} terms")]
    regexes = []
    for expression in _strings(entry.get("regexes", []), f"rule {rule_id!r} regexes"):
        try:
            regexes.append(re.compile(expression))
        except re.error as exc:
            raise SettingError("--policy", f"rule {rule_id!r}: bad regular expression ({exc})") from exc
    if not terms and not regexes:
        raise SettingError("--policy", f"rule {rule_id!r}: needs `terms` or `regexes`")
    written = tuple(pattern for _, pattern in terms if pattern is not None)
    return Rule(rule_id, tuple(pattern for pattern, _ in terms), tuple(regexes), written)


def _rules(entries: Any, where: str, taken: set[str]) -> tuple[Rule, ...]:
    if not isinstance(entries, list):
        raise SettingError("--policy", f"{where}: a list of rules")
    rules = tuple(_rule(entry, f"{where}[{i}]") for i, entry in enumerate(entries))
    for rule in rules:
        if rule.id in taken:
            raise SettingError("--policy", f"rule id {rule.id!r} is used twice")
        taken.add(rule.id)
    return rules


@dataclass(frozen=True)
class PromptPolicy:
    rules: tuple[Rule, ...] = ()
    overrides: Mapping[str, Override] = field(default_factory=dict)  # by token name

    @classmethod
    def from_dict(cls, document: Any) -> PromptPolicy:
        if not isinstance(document, dict) or set(document) - {"rules", "overrides"}:
            raise SettingError("--policy", "an object with `rules` and optionally `overrides`")
        taken: set[str] = set()
        rules = _rules(document.get("rules", []), "rules", taken)
        overrides = {}
        entries = document.get("overrides") or {}
        if not isinstance(entries, dict):
            raise SettingError("--policy", "overrides: an object of token name -> {`exempt`, `rules`}")
        for token, entry in entries.items():
            if not isinstance(entry, dict) or set(entry) - _OVERRIDE_KEYS:
                raise SettingError("--policy", f"overrides[{token!r}]: an object with `exempt` and/or `rules`")
            exempt = frozenset(_strings(entry.get("exempt", []), f"overrides[{token!r}].exempt"))
            if unknown := exempt - {rule.id for rule in rules} - {"*"}:
                raise SettingError("--policy", f"overrides[{token!r}].exempt: no rules {sorted(unknown)}")
            overrides[str(token)] = Override(exempt, _rules(entry.get("rules", []), f"overrides[{token!r}]", taken))
        return cls(rules, overrides)

    @classmethod
    def from_file(cls, path: Path) -> PromptPolicy:
        try:
            text = path.read_text()
            document = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
        except (OSError, ValueError, RecursionError, yaml.YAMLError) as exc:  # RecursionError: nesting too deep
            raise SettingError("--policy", f"{path}: {exc}") from exc
        return cls.from_dict(document)

    def rules_for(self, token: str | None) -> list[Rule]:
        override = self.overrides.get(token, Override()) if token is not None else Override()
        if "*" in override.exempt:
            return list(override.rules)
        return [rule for rule in self.rules if rule.id not in override.exempt] + list(override.rules)

    def check(self, texts: Iterable[tuple[str, str]], token: str | None) -> Violation | None:
        """The first rule that one of the (field, text) pairs breaks, for the caller's token; None when clean."""
        rules = self.rules_for(token)
        for name, text in texts:
            if not text:
                continue
            normalised = normalise(text)
            folded = fold_lookalikes(normalised)
            readings = policy_readings(normalised, folded) if any(rule.regexes for rule in rules) else []
            for rule in rules:
                if rule.matches(normalised, folded, readings):
                    return Violation(rule.id, name)
        return None

    def check_request(self, request: Any, token: str | None) -> Violation | None:
        """`check` of a Generate or Understand request's texts (`request_texts`)."""
        return self.check(request_texts(request), token)


ANSWER_WINDOW = 1024  # characters before a streamed delta that are checked again with it


class AnswerScan:
    """A streamed answer checked delta by delta in time linear in its length: each check reads the new delta and at
    most ANSWER_WINDOW (normalised) characters before it, not the whole answer again.

    A match that straddles deltas is found while it is shorter than the window: every term of a sensible policy.
    A regular expression's match has no bound (nor has a term's run of white space); one longer than the window is
    found only by the check of the whole answer at its end, after its deltas went out. The window starts at a
    non-word character, so its cut never makes a word's tail read as a whole word; `^` in a regex means the
    window's start."""

    def __init__(self) -> None:
        self.tail = ""

    def window(self, delta: str) -> str:
        """The text to check with `delta`: the new delta and the window before it."""
        text = normalise(self.tail + delta)  # together: a combining mark may open the delta
        tail = text[-ANSWER_WINDOW:]
        if len(text) > ANSWER_WINDOW:
            cut = _NON_WORD.search(tail)
            tail = tail[cut.start() :] if cut else tail  # one word longer than the window: kept whole
        self.tail = tail
        return text


_NON_WORD = re.compile(rf"[^\w{MARK}]")  # not MARK: a window opening "<MARK>pe" would read "pe" as a whole word


class PolicyFile:
    """The policy in force, read from `path`; `reload` (on SIGHUP) swaps it for the file's new content."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.policy = PromptPolicy.from_file(path)  # a bad file at start-up stops the server: fail loudly

    def reload(self) -> bool:
        try:
            policy = PromptPolicy.from_file(self.path)
        except SettingError as exc:
            log.error("policy reload failed, the previous policy stays in force: %s", exc)
            return False
        except Exception:  # a case from_dict does not know yet must not end the SIGHUP handler
            log.exception("policy reload failed, the previous policy stays in force")
            return False
        self.policy = policy
        log.info(
            "policy reloaded from %s: %d rules, %d token overrides", self.path, len(policy.rules), len(policy.overrides)
        )
        return True


def request_texts(request: Any) -> list[tuple[str, str]]:
    """The (field, text) pairs of a Generate or Understand request that the policy reads."""
    if isinstance(request, pb.GenerateRequest):
        return [("prompt", request.prompt), ("negative_prompt", request.negative_prompt)]
    if isinstance(request, pb.UnderstandRequest):
        return [
            (f"messages[{i}].content[{j}].text", part.text)
            for i, message in enumerate(request.messages)
            for j, part in enumerate(message.content)
            if part.HasField("text")
        ]
    return []

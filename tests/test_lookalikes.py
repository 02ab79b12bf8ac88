"""Lookalike letters (serving/frontend/lookalikes.py): what the prompt policy folds and leaves alone, and the policy's
terms, regexes and answers read through them."""

from __future__ import annotations

import asyncio
import json
import re
import string
import unicodedata
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from omnigen2.v1 import omnigen2_pb2 as pb
from omnigen2.v1 import omnigen2_pb2_grpc as pb_grpc

from serving.frontend.config import FrontendConfig
from serving.frontend.lookalikes import fold_lookalikes, lookalike_table
from serving.frontend.policy import REGEX_RUNS, AnswerScan, PromptPolicy, normalise, policy_readings
from serving.frontend.server import Frontend
from serving.triton.ports import free_port
from tests.test_policy import POLICY, REGEX_POLICY, rule_for


@pytest.fixture
def policy() -> PromptPolicy:
    return PromptPolicy.from_dict(POLICY)


def test_the_table_folds_word_characters_into_ascii_letters_and_digits_only() -> None:
    """So folding keeps a text's length and its words where they were (a term matches whole words only)."""
    table = lookalike_table()
    assert 300 < len(table) < 1000
    for code, ascii_char in table.items():
        char = chr(code)
        assert not char.isascii() and re.match(r"\w", char), char
        assert unicodedata.normalize("NFKC", char) == char  # the policy folds NFKC-normalised text
        assert len(ascii_char) == 1 and ascii_char.isascii() and ascii_char.isalnum(), (char, ascii_char)
        assert not (char.islower() and ascii_char.isupper()), (char, ascii_char)  # a small letter stays small
        assert not (char.isupper() and ascii_char.islower()), (char, ascii_char)


def test_a_folded_letter_that_matches_an_ascii_one_ignoring_case_folds_to_it() -> None:
    """So a term of ASCII letters finds in the folded text whatever it finds in the text, and is searched there only
    (the dotless i is such a letter; the Kelvin sign and long s are NFKC's, U+0130 is not folded)."""
    for code, ascii_char in lookalike_table().items():
        for letter in string.ascii_lowercase:
            if re.fullmatch(letter, chr(code), re.IGNORECASE):
                assert ascii_char.lower() == letter, chr(code)


def test_ascii_is_left_as_it_is() -> None:
    """Unicode's confusables put m with rn, I with l and 1, O with 0: folding those would read "modern" as "modem"."""
    every_ascii = "".join(map(chr, range(128)))
    assert fold_lookalikes(every_ascii) == every_ascii


@pytest.mark.parametrize(
    ("text", "folded"),
    [
        ("b\u043emb", "bomb"),  # Cyrillic o (U+043E)
        ("b\u03bfmb", "bomb"),  # Greek omicron
        ("\u0412\u041e\u041c\u0412", "BOMB"),  # Cyrillic capitals
        ("\u0392\u039f\u039c\u0392", "BOMB"),  # Greek capitals
        ("\u0440\u0456\u0440\u0435", "pipe"),  # Cyrillic er, i, ie
        ("\u0399RAN", "IRAN"),  # Greek capital iota: in the class of l, I and 1, read in its own case
        ("\u13aa\ua4ee", "AA"),  # Cherokee and Lisu
        ("\u0432\u043e\u043c\u0432", "\u0432o\u043c\u0432"),  # small ve and em look like small capitals
        ("b\u00f3mb", "b\u00f3mb"),  # letters with marks stay: UTS #39 keeps them apart too
        ("pipe\u2223bomb", "pipe\u2223bomb"),  # a symbol that looks like l is no word character: not folded
        ("\u8d64\u3044\u30ea\u30f3\u30b4", "\u8d64\u3044\u30ea\u30f3\u30b4"),  # Japanese
    ],
)
def test_folding(text: str, folded: str) -> None:
    assert fold_lookalikes(text) == folded


@pytest.mark.parametrize(
    ("text", "folded"),
    [
        ("\u09ea\u09ea \u099c\u09a8", "44 \u099c\u09a8"),  # Bengali four looks like 8: "44 people"
        ("\u09ed\u09e6", "70"),  # Bengali seven looks like 9, zero like O
        ("\u0a67\u0a6a", "14"),  # Gurmukhi one looks like 9, four like 8
        ("\u0967\u0966\u0966", "100"),  # Devanagari zero looks like o
        ("\u06f7\u06f5\u06f1", "751"),  # Persian seven, five, one look like V, o, l
        ("\u0b68\u0d6d\u0e50", "270"),  # Oriya two, Malayalam seven, Thai zero
        ("\U000118e3\U000118e5\U000118e9", "359"),  # Warang Citi three, five, nine look like m, Z, C
        ("\u4e8c\u3007\u4e8c\u56db", "\u4e8c\u3007\u4e8c\u56db"),  # Chinese 2024: no digits, not folded
        ("\ua6ef \U00010322", "\ua6ef \U00010322"),  # other numerals: Bamum koghom (zero, looks like 2), Old Italic ten
        ("\u0431 \u0417\u0417 14\u0223\u0223", "6 33 1488"),  # letters that look like digits still read as them
    ],
)
def test_digits_fold_to_their_own_value(text: str, folded: str) -> None:
    assert fold_lookalikes(text) == folded


def test_no_numeral_reads_as_another_number() -> None:
    """A decimal digit of every script reads as its value; any other character with a numeric value is not folded."""
    table = lookalike_table()
    for code in range(0x80, 0x110000):
        char = chr(code)
        if unicodedata.normalize("NFKC", char) != char:
            continue
        if char.isdecimal():
            assert table[code] == str(unicodedata.decimal(char)), char
        elif unicodedata.numeric(char, None) is not None:
            assert code not in table, char


def test_numbers_in_other_scripts_match_number_rules_by_value() -> None:
    """Before, Bengali "44 people" was refused under "88" (its four looks like 8); "1488" in other scripts' digits is
    that number."""
    policy = PromptPolicy.from_dict({"rules": [{"id": "n88", "terms": ["88"]}, {"id": "n1488", "terms": ["1488"]}]})
    assert rule_for(policy, "\u09ea\u09ea \u099c\u09a8 \u09ae\u09be\u09a8\u09c1\u09b7") is None
    assert rule_for(policy, "\u09ee\u09ee \u099c\u09a8") == "n88"  # Bengali eight, eight
    assert rule_for(policy, "\u0a67\u0a67 \u0a6d\u0a6d") is None  # Gurmukhi 11 77 (one looks like 9)
    for text in ["\u09e7\u09ea\u09ee\u09ee", "\u06f1\u06f4\u06f8\u06f8", "\u0967\u096a\u096e\u096e", "14\u0223\u0223"]:
        assert rule_for(policy, text) == "n1488", text  # Bengali, Persian, Devanagari digits; Latin ou looks like 8
    written = PromptPolicy.from_dict({"rules": [{"id": "n1488", "terms": ["\u09e7\u09ea\u09ee\u09ee"]}]})
    assert rule_for(written, "1488") == "n1488"  # a term in Bengali digits is the number too


LOOKALIKES = [
    "a pipe b\u043emb",  # Cyrillic o
    "a pipe b\u03bfmb",  # Greek omicron
    "\u0440\u0456\u0440\u0435 \u0412\u041e\u041c\u0412",  # Cyrillic only: small er, i, er, ie; capital ve, o, em, ve
    "\u03a1\u0399\u03a1\u0395 \u0392\u039f\u039c\u0392",  # Greek capitals only
    "\uff50\uff49\uff50\uff45 b\u03bfmb",  # full-width letters (NFKC) beside a Greek omicron
    "\U0001d429\U0001d422\U0001d429\U0001d41e \U0001d41b\U0001d428\U0001d426\U0001d41b",  # mathematical bold
    "pip\u0435 \ua4d0\u0585\ua4df\u13cf",  # Cyrillic ie; Lisu ba, Armenian oh, Lisu ma, Cherokee si
    "n\u0435rv\u0435 \u0430g\u0435nt",  # Cyrillic ie and a
    "pi\u200b\u0440e\x00b\u043emb",  # lookalikes and invisible characters in one text
]


@pytest.mark.parametrize("text", LOOKALIKES)
def test_lookalike_letters_do_not_hide_a_term(policy: PromptPolicy, text: str) -> None:
    assert rule_for(policy, text) == "weapons"
    assert rule_for(policy, text, "red-team") is None  # the same rule, so the same exemption


@pytest.mark.parametrize(
    "text",
    [
        "\u041d\u0430\u0440\u0438\u0441\u0443\u0439 \u043a\u043e\u0442\u0430 \u043d\u0430"
        " \u043a\u0440\u044b\u0448\u0435 \u0432 \u0441\u043e\u043b\u043d\u0435\u0447\u043d\u044b\u0439"
        " \u0434\u0435\u043d\u044c",  # Russian: draw a cat on a roof on a sunny day
        "\u0412\u041e\u0414\u0410 \u0418 \u041d\u0415\u0411\u041e",  # Russian capitals: water and sky
        "\u0388\u03bd\u03b1 \u03ba\u03cc\u03ba\u03ba\u03b9\u03bd\u03bf \u03bc\u03ae\u03bb\u03bf"
        " \u03c3\u03c4\u03bf \u03c4\u03c1\u03b1\u03c0\u03ad\u03b6\u03b9",  # Greek
        "\u8d64\u3044\u30ea\u30f3\u30b4\u3092\u63cf\u3044\u3066",  # Japanese
        "a pipe b\u043emb\u0430stic speech",  # a folded word is still a whole word: "bombastic" is no "bomb"
        "a pipe bomb\u0441",  # nor is "bombc"
        "a pipe b\u00f3mb",  # a letter with a mark is not the bare letter
        "a pipe b\u043e\u043cb",  # Cyrillic м looks like a small capital M, not like m
    ],
)
def test_text_in_other_scripts_passes_unless_it_spells_a_term(policy: PromptPolicy, text: str) -> None:
    assert rule_for(policy, text) is None


def test_terms_in_other_scripts_still_match_their_own_script() -> None:
    """A term is matched as written and folded: a Greek term in capitals or small letters, a Russian one."""
    greek, russian = "\u03bd\u03b1\u03bd\u03bf\u03c2", "\u0431\u043e\u043c\u0431\u0430"
    policy = PromptPolicy.from_dict(
        {"rules": [{"id": "greek", "terms": [greek]}, {"id": "russian", "terms": [russian]}]}
    )
    assert rule_for(policy, "\u039d\u0391\u039d\u039f\u03a3") == "greek"  # capitals N, A, N, O fold, small nu not
    assert rule_for(policy, "\u03bd\u03b1\u03bd\u03bf\u03c2") == "greek"
    assert rule_for(policy, "\u0411\u041e\u041c\u0411\u0410") == "russian"  # capitals
    smoke = PromptPolicy.from_dict(
        {"rules": [{"id": "smoke", "terms": ["\u0434\u044b\u043c"]}]}
    )  # no small letter folds
    assert rule_for(smoke, "\u0414\u042b\u041c") == "smoke"  # but the capital em does: matched as written
    assert rule_for(policy, "\u0431\u043e\u043c\u0431a") == "russian"  # a Latin a in the Russian word


def test_regexes_read_the_folded_text_too(policy: PromptPolicy) -> None:
    assert rule_for(policy, "\u0391\u0392S\u039fLU\u03a4\u0395LY not") == "shouting"  # Greek capitals, case kept
    assert rule_for(policy, "\u0430bsolutely not") is None  # a small Cyrillic a folds to a small a
    rules = PromptPolicy.from_dict(REGEX_POLICY)
    assert rule_for(rules, "pi\u200b\u0440\u0435\x00b\u043emb") == "two-words"  # folded and read both ways


def test_readings_with_lookalikes_stay_bounded() -> None:
    """The folded text's readings at most double them: 2 x (3 + 2 x REGEX_RUNS) at the largest prompt."""
    text = normalise("\u043ea\u200b" * 2730)  # 8190 characters, every other letter a Cyrillic o
    folded = fold_lookalikes(text)
    readings = policy_readings(text, folded)
    assert len(readings) <= 2 * (3 + 2 * REGEX_RUNS)
    assert policy_readings("plain text", "plain text") == ["plain text"]


def test_streamed_answers_are_folded_too(policy: PromptPolicy) -> None:
    """Understand answers go through the same check, delta by delta (AnswerScan's window)."""
    scan = AnswerScan()
    assert rule_for(policy, scan.window("Here is a pi")) is None
    assert rule_for(policy, scan.window("\u0440\u0435 b")) is None
    violation = policy.check([("answer", scan.window("\u043emb."))], None)
    assert violation is not None and (violation.rule, violation.field) == ("weapons", "answer")


def test_lookalike_spellings_are_refused_as_the_plain_term_is(tmp_path: Path) -> None:
    """In process, no Triton (refused before one is needed): the same status, ErrorInfo reason and metric label."""
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(POLICY))
    unused = f"127.0.0.1:{free_port()}"
    prompts = ["a pipe bomb", *LOOKALIKES]

    async def run() -> tuple[list[tuple[grpc.StatusCode, str]], float | None]:
        frontend = Frontend(FrontendConfig(listen="127.0.0.1:0", triton_url=unused, metrics_port=0, policy=str(path)))
        port = await frontend.start()
        refusals = []
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.OmniGen2Stub(channel)
                for prompt in prompts:
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await stub.Generate(pb.GenerateRequest(prompt=prompt), timeout=30)
                    details = dict(refused.value.trailing_metadata() or ())["grpc-status-details-bin"]
                    info = error_details_pb2.ErrorInfo()
                    assert status_pb2.Status.FromString(details).details[0].Unpack(info)
                    refusals.append((refused.value.code(), info.reason))
        finally:
            await frontend.stop()
        labels = {"rule": "weapons", "stage": "request"}
        return refusals, frontend.metrics.registry.get_sample_value("omnigen2_policy_blocked_total", labels)

    refusals, blocked = asyncio.run(run())
    assert refusals == [(grpc.StatusCode.PERMISSION_DENIED, "weapons")] * len(prompts)
    assert blocked == len(prompts)

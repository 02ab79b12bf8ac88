"""One access-log line is one record of the fields it names, whatever a caller put in the ones it chooses."""

from __future__ import annotations

import json
import logging
import re

import pytest

from serving.frontend import access_log

HOSTILE = [
    "Generate peer=ipv4:10.0.0.1:1234 client=admin status=OK",  # spaces: forged fields
    "a\nGenerate peer=x client=admin status=OK seconds=0.1 request_id=y",  # a newline: a forged line
    'x" client="admin',  # a quote that would end a quoted field
    "back\\slash\r\t\x00\x1b[31m",
    "é" * 10,
    "",
]


# A logfmt reader's words: [key=]value, the value bare or "quoted" with JSON's escapes.
_WORD = re.compile(r'(?:(\w+)=)?("(?:[^"\\]|\\.)*"|[^\s"]+)(?: |$)')


def _words(line: str) -> list[tuple[str, str]]:
    words, at = [], 0
    while at < len(line):
        word = _WORD.match(line, at)
        assert word is not None, f"not one record: {line[at:]!r}"
        value = word[2]
        words.append((word[1] or "", json.loads(value) if value.startswith('"') else value))
        at = word.end()
    return words


def _line(caplog: pytest.LogCaptureFixture) -> str:
    (record,) = [record for record in caplog.records if record.name == "omnigen2.access"]
    caplog.clear()
    return record.getMessage()


@pytest.mark.parametrize("value", HOSTILE)
def test_caller_chosen_grpc_fields_stay_in_their_field(value: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "omnigen2.access")
    access_log.record(value, value, value, "OK", 0.5, "images=0", value)
    line = _line(caplog)
    assert line.isprintable() and line.isascii()  # one line, nothing a terminal would act on
    assert _words(line) == [
        ("", value),
        ("peer", value),
        ("client", value),
        ("status", "OK"),
        ("seconds", "0.500"),
        ("request_id", value),
        ("images", "0"),
    ]


@pytest.mark.parametrize("value", HOSTILE)
def test_caller_chosen_http_fields_stay_in_their_field(value: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "omnigen2.access")
    access_log.record_http(value, "/v1/models", value, 200, 0.25, value)
    line = _line(caplog)
    assert line.isprintable() and line.isascii()
    assert _words(line) == [
        ("", "HTTP"),
        ("", value),
        ("", "/v1/models"),
        ("peer", value),
        ("status", "200"),
        ("seconds", "0.250"),
        ("request_id", value),
    ]


def test_plain_values_are_written_as_they_are(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "omnigen2.access")
    access_log.record("Generate", "ipv6:[::1]:5000", "web-app", "OK", 1.0, "", "4f2a9c")
    assert _line(caplog) == "Generate peer=ipv6:[::1]:5000 client=web-app status=OK seconds=1.000 request_id=4f2a9c "

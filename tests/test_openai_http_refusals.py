"""Bodies an attack on the OpenAI gateway sent (serving/frontend/openai_http.py), with a stand-in for the gRPC
service (no Triton): each is refused 400 in the project's own words, naming what is wrong without echoing the
caller's bytes at length or Python's internals."""

from __future__ import annotations

import json

import pytest

from tests.gateways import gateway_post, multipart


def test_a_text_part_in_an_unknown_charset_is_refused_400() -> None:
    """Before: 500 "internal error" and an ERROR traceback (LookupError from aiohttp's post())."""
    body, headers = multipart(("prompt", "Content-Type: text/plain; charset=no-such-codec\r\n", b"x"))
    status, answer, calls = gateway_post("/v1/images/edits", body, headers)
    assert (status, answer["error"]["code"], calls) == (400, "invalid_body", 0), answer
    assert "charset" in answer["error"]["message"] and "no-such-codec" in answer["error"]["message"]


def test_a_long_unknown_field_name_is_cut_in_the_answer() -> None:
    """Before: a 100 KB key came back whole, twice (message and param)."""
    key = "k" * 100_000
    body = json.dumps({"prompt": "x", key: 1}).encode()
    status, answer, calls = gateway_post("/v1/images/generations", body, {"Content-Type": "application/json"})
    assert (status, answer["error"]["code"], calls) == (400, "unknown_parameter", 0)
    assert len(json.dumps(answer)) < 500 and answer["error"]["param"].startswith("kkk")


def test_a_repeated_long_form_name_is_cut_in_the_answer() -> None:
    body, headers = multipart(("n" * 4000 + "[]", "", b"1"))
    status, answer, calls = gateway_post("/v1/images/edits", body, headers)
    assert (status, calls) == (400, 0) and len(json.dumps(answer)) < 500, answer


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", "an integer of over 4300 digits"),
        (b"[" * 100_000 + b"]" * 100_000, "nest deeper than any request's"),
        (b'{"prompt": NaN}', "NaN is not JSON"),
        (b'{"prompt": ', "Expecting value"),
        (b'{"prompt":"\xff"}', "it is not UTF-8 text"),
    ],
    ids=["digits", "depth", "nan", "cut", "not-utf8"],
)
def test_json_that_python_cannot_read_is_refused_in_the_projects_words(body: bytes, reason: str) -> None:
    """Before: "use sys.set_int_max_str_digits() to increase the limit", "maximum recursion depth exceeded"."""
    status, answer, _ = gateway_post("/v1/images/generations", body, {"Content-Type": "application/json"})
    message = answer["error"]["message"]
    assert (status, answer["error"]["code"]) == (400, "invalid_json") and reason in message, message
    assert "sys." not in message and "recursion" not in message and ("digits" in message) == ("digits" in reason)


def test_a_part_header_over_the_parsers_limit_is_refused_without_its_bytes() -> None:
    """Before: aiohttp's message, with the first 100 bytes of the line quoted, over three lines."""
    body, headers = multipart(("n" * 10_000, "", b"1"))
    status, answer, calls = gateway_post("/v1/images/edits", body, headers)
    message = answer["error"]["message"]
    assert (status, answer["error"]["code"], calls) == (400, "invalid_body", 0)
    assert message == "the body does not parse: Got more than 8190 bytes when reading", message

"""The OpenAI gateway takes request bodies as sent (serving/frontend/openai_http.py), with a stand-in for the gRPC
service (no Triton): a compressed body is refused 415 unread. Before, aiohttp inflated `Content-Encoding: gzip`
bodies while the size limit applied to the compressed bytes they came as: 81 KB became 84 MB in the gateway."""

from __future__ import annotations

import gzip
import json
import zlib

import pytest

from tests.gateways import gateway_answer

BODY = json.dumps({"prompt": "x"}).encode()
ENCODED = {"gzip": gzip.compress(BODY), "deflate": zlib.compress(BODY), "br": BODY, "x-unknown": BODY}


@pytest.mark.parametrize("encoding", list(ENCODED))
def test_a_compressed_json_body_is_refused_unread(encoding: str) -> None:
    """Before: the gzip and deflate bodies were inflated, parsed and called Generate (200)."""
    headers = {"Content-Type": "application/json", "Content-Encoding": encoding}
    status, answer, got, calls = gateway_answer("/v1/images/generations", ENCODED[encoding], headers)
    assert status == 415 and calls == 0, (status, answer)
    assert got["Accept-Encoding"] == "identity"
    assert answer["error"]["code"] == "unsupported_content_encoding"
    assert f"Content-Encoding {encoding}" in answer["error"]["message"]


def test_a_compressed_form_is_refused_unread() -> None:
    form = (
        b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nx\r\n'
        b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\npng\r\n--b--\r\n'
    )
    headers = {"Content-Type": "multipart/form-data; boundary=b", "Content-Encoding": "gzip"}
    status, answer, _, calls = gateway_answer("/v1/images/edits", gzip.compress(form), headers)
    assert status == 415 and calls == 0, (status, answer)


@pytest.mark.parametrize("encoding", ["identity", "Identity", ""])
def test_an_identity_body_is_taken(encoding: str) -> None:
    headers = {"Content-Type": "application/json", "Content-Encoding": encoding}
    status, answer, _, calls = gateway_answer("/v1/images/generations", BODY, headers)
    assert status == 200 and calls == 1, (status, answer)

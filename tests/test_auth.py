"""The tokens file is checked when it is read, and the bearer scheme is matched as RFC 7235 says (any case)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest

from serving.errors import SettingError
from serving.frontend.auth import TokenRegistry, token_digest
from serving.frontend.status import ApiError

GENERATE = "/omnigen2.v1.OmniGen2/Generate"


def _file(tmp_path: Path, **entry: Any) -> Path:
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"tokens": [{"name": "t", "sha256": token_digest("secret")} | entry]}))
    return path


@pytest.mark.parametrize(
    ("entry", "field"),
    [
        ({"rate_per_minute": 0}, "rate_per_minute"),  # divided by zero on the first call
        ({"rate_per_minute": -5}, "rate_per_minute"),  # meant no limit
        ({"rate_per_minute": float("nan")}, "rate_per_minute"),  # json writes NaN, and reads it back
        ({"rate_per_minute": "60"}, "rate_per_minute"),
        ({"burst": 0.5}, "burst"),  # the bucket never holds a whole call
        ({"methods": "Generate"}, "methods"),  # a string: every method denied
        ({"methods": ["Generate", "generate"]}, "methods"),  # a typo: that method denied on every call
        ({"methods": ["Health"]}, "methods"),  # not the service's: open to all anyway
        ({"sha256": "abc"}, "sha256"),
    ],
)
def test_bad_entries_are_refused_naming_the_token_and_field(tmp_path: Path, entry: dict[str, Any], field: str) -> None:
    with pytest.raises(SettingError, match=rf"tokens\[0\] \('t'\)\.{field}:") as refused:
        TokenRegistry.from_file(_file(tmp_path, **entry))
    assert refused.value.setting == "--auth-tokens"


def test_an_unknown_method_is_named(tmp_path: Path) -> None:
    with pytest.raises(SettingError, match=r"no method 'generate' \(case-sensitive: Generate, GenerateStream, Ge"):
        TokenRegistry.from_file(_file(tmp_path, methods=["GetModelInfo", "generate"]))


def test_every_method_of_the_service_may_be_named(tmp_path: Path) -> None:
    methods = ["Generate", "GenerateStream", "Understand", "GetModelInfo"]
    (policy,) = TokenRegistry.from_file(_file(tmp_path, methods=methods)).policies.values()
    assert policy.methods == set(methods)


def test_a_bad_file_stops_the_front_end(tmp_path: Path) -> None:
    """In a process of its own: the front end starts gRPC's threads, and a test process that has them cannot fork
    safely (tests/test_build_cache_lock.py's racers hung so)."""
    bad = _file(tmp_path, rate_per_minute=0)
    command = [sys.executable, "-m", "serving.frontend.server", "--auth-tokens", str(bad), "--listen", "127.0.0.1:0"]
    stopped = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert stopped.returncode == 1 and "rate_per_minute" in stopped.stderr


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_the_bearer_scheme_is_case_insensitive(tmp_path: Path, scheme: str) -> None:
    registry = TokenRegistry.from_file(_file(tmp_path, methods=["Generate"]))
    policy = registry.identify([("authorization", f"{scheme} secret")])
    assert policy is not None and policy.name == "t"
    registry.check(GENERATE, [("authorization", f"{scheme} secret")])


def test_other_schemes_and_unknown_tokens_are_refused(tmp_path: Path) -> None:
    registry = TokenRegistry.from_file(_file(tmp_path))
    for value in ("Basic secret", "Bearersecret", "Bearer other", "secret"):
        with pytest.raises(ApiError) as refused:
            registry.check(GENERATE, [("authorization", value)])
        assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED

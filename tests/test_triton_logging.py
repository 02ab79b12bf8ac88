"""The Triton models' failures reach Triton's log (pb_utils.Logger) with the request id and, for the server's own
errors, the traceback. Runs without Triton: a stand-in `triton_python_backend_utils` records what is logged."""

from __future__ import annotations

import importlib
import logging
import sys
import types
from collections.abc import Iterator
from typing import Any

import pytest

from serving.errors import InvalidArgumentError

LINES: list[tuple[str, str]] = []  # (Triton log level, message) as the stand-in Logger received them


def _request(request_id: str) -> Any:
    """A Triton request as far as logging sees it: Triton's request id, which the front end set."""
    return types.SimpleNamespace(request_id=lambda: request_id)


def _writer(level: str) -> Any:
    return lambda message: LINES.append((level, message))


@pytest.fixture
def responses(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    LINES.clear()
    logger = types.SimpleNamespace(**{f"log_{level}": _writer(level) for level in ("error", "warn", "info", "verbose")})
    fake = types.ModuleType("triton_python_backend_utils")
    fake.Logger = logger  # type: ignore[attr-defined]
    fake.TritonError = lambda message: message  # type: ignore[attr-defined]
    fake.InferenceResponse = lambda error: types.SimpleNamespace(error=error)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    monkeypatch.delitem(sys.modules, "serving.triton.responses", raising=False)
    root = logging.getLogger("serving")
    saved = (list(root.handlers), root.level, root.propagate)
    importlib.import_module("serving.triton.log").route_to_triton()
    yield importlib.import_module("serving.triton.responses")
    root.handlers[:], root.level, root.propagate = saved


def test_an_internal_error_is_logged_with_its_traceback_and_request_id(responses: Any) -> None:
    try:
        raise RuntimeError("transformer exploded")
    except RuntimeError as exc:
        response = responses.error_response(exc, _request("req-7"))
    assert response.error == "INTERNAL: RuntimeError: transformer exploded"  # the caller gets one line
    [(level, message)] = LINES
    assert level == "error" and "request_id=req-7 failed" in message
    assert "Traceback (most recent call last)" in message and 'raise RuntimeError("transformer exploded")' in message


def test_a_callers_mistake_is_one_info_line(responses: Any) -> None:
    responses.error_response(InvalidArgumentError("steps", "must be positive"), _request("req-8"))
    assert LINES == [
        ("info", "serving.triton.responses: request_id=req-8 ended: INVALID_ARGUMENT: steps: must be positive")
    ]


def test_routing_is_installed_once(responses: Any) -> None:
    importlib.import_module("serving.triton.log").route_to_triton()
    logging.getLogger("serving.triton.step_batcher").warning("retrying")
    assert LINES == [("warn", "serving.triton.step_batcher: retrying")]

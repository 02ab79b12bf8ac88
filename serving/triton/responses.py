"""Response helpers shared by the decoupled Python models (`omnigen2`, `mllm`): JSON events, coded errors, and
the request id (Triton's own request field, which the front end sets to the call's id), which every failure is
logged with so that it can be found from the front end's access log."""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from serving.errors import ComponentDiedError, InvalidArgumentError
from serving.triton.wire import WireError

log = logging.getLogger(__name__)


def event(payload: dict[str, Any]) -> Any:
    """The `event` output: one JSON object."""
    return pb_utils.Tensor("event", np.array([json.dumps(payload).encode()], dtype=np.object_))


def error_response(exc: BaseException, request: Any) -> Any:
    """A final error response whose message starts with the status code (stream errors carry no code), logged
    with the request's id: a one-line note for the caller's own mistakes, the traceback for the server's."""
    if isinstance(exc, InvalidArgumentError):
        error = WireError("INVALID_ARGUMENT", exc.description, exc.field)
    elif isinstance(exc, CancelledByCallerError):
        error = WireError("CANCELLED", "cancelled by the caller")
    elif isinstance(exc, ComponentDiedError):
        error = WireError("UNAVAILABLE", str(exc))
    else:
        error = WireError("INTERNAL", f"{type(exc).__name__}: {exc}")
    request_id = request.request_id() or "-"  # the front end's id of the call; none on the BLS's own calls
    if error.code == "INTERNAL":
        log.error("request_id=%s failed: %s", request_id, error, exc_info=exc)
    else:
        log.info("request_id=%s ended: %s", request_id, error)
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error)))


def request_json(request: Any) -> dict[str, Any]:
    """The `request` input: one JSON object, or INVALID_ARGUMENT naming it."""
    raw = pb_utils.get_input_tensor_by_name(request, "request")
    if raw is None:
        raise InvalidArgumentError("request", "missing")
    try:
        params = json.loads(raw.as_numpy().reshape(-1)[0])
    except (ValueError, IndexError) as exc:
        raise InvalidArgumentError("request", f"not a JSON object ({exc})") from exc
    if not isinstance(params, dict):
        raise InvalidArgumentError("request", "not a JSON object")
    return params


def encoded_images(request: Any, limit: int) -> list[bytes]:
    """The optional `images` input: encoded image files, at most `limit`."""
    encoded = pb_utils.get_input_tensor_by_name(request, "images")
    blobs = [] if encoded is None else [bytes(blob) for blob in encoded.as_numpy().reshape(-1)]
    if len(blobs) > limit:
        raise InvalidArgumentError("images", f"at most {limit} input images")
    return blobs


class CancelledByCallerError(Exception):
    pass

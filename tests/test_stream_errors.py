"""How the front end reads an error that ends a Triton stream (serving/frontend/triton_backend.py): the BLS's own
coded messages, and Triton's words for a model whose process died or that is being loaded again, which the caller
may retry (UNAVAILABLE); anything else is INTERNAL."""

from __future__ import annotations

import grpc
import pytest

from serving.frontend.triton_backend import _stream_error

UNAVAILABLE, INTERNAL = grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL


@pytest.mark.parametrize(
    ("message", "code", "says"),
    [
        # The BLS's watch over mllm (component_watch.py), coded by the BLS.
        ("UNAVAILABLE: the mllm model's process died under this request; retry the call", UNAVAILABLE, "under this"),
        # Triton 2.51's words (libtritonserver), for a model between the watchdog's unload and load.
        ("Request for unknown model: 'omnigen2' has no available versions", UNAVAILABLE, "being loaded again"),
        ("Request for unknown model: 'mllm' version 1 is not at ready state", UNAVAILABLE, "being loaded again"),
        # The same, met by the BLS's own call to a component: its message names the component first.
        (
            "INTERNAL: ComponentError: transformer: Request for unknown model: 'transformer' has no available versions",
            UNAVAILABLE,
            "being loaded again",
        ),
        ("INTERNAL: ComponentError: mllm: Stub process 'mllm_0_0' is not healthy.", UNAVAILABLE, "process died"),
        # A model Triton never knew is a broken deployment, not a reload.
        ("Request for unknown model: 'omnigen3' is not found", INTERNAL, "generation failed"),
        ("INTERNAL: RuntimeError: boom", INTERNAL, "generation failed"),
    ],
)
def test_stream_errors_map_to_the_status_the_api_promises(message: str, code: grpc.StatusCode, says: str) -> None:
    error = _stream_error(message, retry_after_s=1.0)
    assert error.code is code and says in error.status.details, error.status.details

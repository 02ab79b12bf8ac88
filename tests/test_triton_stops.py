"""Stop requests reach the `mllm` answer they name however its worker thread is scheduled (serving/triton/stops.py,
serving/triton/mllm.py). Runs without Triton: a stand-in `triton_python_backend_utils`, stand-in requests, and
worker threads the test starts itself, in the worst order."""

from __future__ import annotations

import importlib
import json
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import pytest

from serving.pipeline.understand import ChatResult
from serving.triton.wire import CALL_PARAMETER, STOP_PARAMETER

FINAL = 1


class _Sender:
    def __init__(self) -> None:
        self.sent: list[tuple[Any, int]] = []

    def send(self, response: Any = None, flags: int = 0) -> None:
        self.sent.append((response, flags))


class _Request:
    """A Triton request as the model reads it: its parameters and its response sender."""

    def __init__(self, **parameters: str) -> None:
        self._parameters = json.dumps(parameters)
        self.sender = _Sender()

    def parameters(self) -> str:
        return self._parameters

    def get_response_sender(self) -> _Sender:
        return self.sender

    def is_cancelled(self) -> bool:
        return False

    def request_id(self) -> str:
        return "req-1"


class _Understander:
    """Answers "cancelled" if the request was asked to stop by the time its work starts."""

    def stream(
        self, request: Any, is_cancelled: Callable[[], bool], is_stopped: Callable[[], bool]
    ) -> Iterator[ChatResult]:
        yield ChatResult("", [], 1, "cancelled" if is_cancelled() else "stop")


class _LaterThread:
    """A worker thread that starts only when the test says so."""

    made: ClassVar[list[_LaterThread]] = []

    def __init__(self, target: Callable[..., None], args: tuple[Any, ...] = (), **_: Any) -> None:
        self.target, self.args = target, args
        _LaterThread.made.append(self)

    def start(self) -> None:
        pass

    def run(self) -> None:
        self.target(*self.args)


@pytest.fixture
def mllm(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    fake = types.ModuleType("triton_python_backend_utils")
    metric = types.SimpleNamespace(increment=lambda n: None)
    family = types.SimpleNamespace(Metric=lambda labels: metric)
    fake.MetricFamily = lambda **kwargs: family  # type: ignore[attr-defined]
    fake.MetricFamily.GAUGE = 0
    fake.TRITONSERVER_RESPONSE_COMPLETE_FINAL = FINAL  # type: ignore[attr-defined]
    fake.get_input_tensor_by_name = lambda request, name: None  # type: ignore[attr-defined]
    fake.TritonError = lambda message: message  # type: ignore[attr-defined]
    fake.InferenceResponse = lambda output_tensors=None, error=None: error or "done"  # type: ignore[attr-defined]
    fake.Tensor = lambda name, value: value  # type: ignore[attr-defined]
    fake.Logger = types.SimpleNamespace(**{f"log_{n}": print for n in ("error", "warn", "info", "verbose")})  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    for name in ("serving.triton.stops", "serving.triton.responses", "serving.triton.mllm"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    module = importlib.import_module("serving.triton.mllm")
    monkeypatch.setattr(module.threading, "Thread", _LaterThread)
    _LaterThread.made.clear()
    model = module.TritonPythonModel.__new__(module.TritonPythonModel)
    model.stops = module.Stops("mllm")
    model.workers = set()
    model.understander = _Understander()
    model._parse = lambda request: request
    yield model
    for name in ("serving.triton.stops", "serving.triton.responses", "serving.triton.mllm"):
        sys.modules.pop(name, None)


def test_a_stop_finds_its_answer_even_before_the_answers_worker_runs(mllm: Any) -> None:
    answer, stop = _Request(**{CALL_PARAMETER: "k1"}), _Request(**{STOP_PARAMETER: "k1"})
    mllm.execute([answer])
    mllm.execute([stop])
    for worker in reversed(_LaterThread.made):  # the stop's worker (if it has one) first: the worst order
        worker.run()
    assert stop.sender.sent == [(None, FINAL)]  # a stop request's empty final response
    [(response, flags)] = answer.sender.sent
    assert flags == FINAL and "CANCELLED" in str(response)  # stopped, not answered


def test_an_answer_nobody_stops_is_answered(mllm: Any) -> None:
    answer = _Request(**{CALL_PARAMETER: "k2"})
    mllm.execute([answer])
    for worker in _LaterThread.made:
        worker.run()
    assert answer.sender.sent == [("done", FINAL)]
    mllm.execute([_Request(**{STOP_PARAMETER: "k2"})])  # too late: the answer has ended and left
    assert not mllm.stops._running


class _NoThread(_LaterThread):
    def start(self) -> None:
        raise RuntimeError("can't start new thread")


def test_a_request_whose_thread_does_not_start_is_answered_and_leaves(
    mllm: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: it stayed registered, counted running, and never got a final response."""
    module = sys.modules["serving.triton.mllm"]
    monkeypatch.setattr(module.threading, "Thread", _NoThread)
    counted: list[int] = []
    mllm.stops._gauge = types.SimpleNamespace(increment=counted.append)
    answer = _Request(**{CALL_PARAMETER: "k3"})
    mllm.execute([answer])
    [(response, flags)] = answer.sender.sent
    assert flags == FINAL and str(response).startswith("INTERNAL: RuntimeError: can't start new thread")
    assert not mllm.stops._running and sum(counted) == 0 and not mllm.workers
    encode = _Request()  # the BLS's prompt encoding: no registration, but a final response all the same
    monkeypatch.setattr(module.pb_utils, "get_input_tensor_by_name", lambda request, name: object())
    mllm.execute([encode])
    [(response, flags)] = encode.sender.sent
    assert flags == FINAL and str(response).startswith("INTERNAL: RuntimeError")

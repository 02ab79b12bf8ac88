"""The stub watchdog (serving/triton/watchdog.py) with stand-ins for /proc's stubs and for Triton's model control."""

from __future__ import annotations

import pytest

from serving.triton import watchdog
from serving.triton.watchdog import StubWatchdog

SERVER_PID = 100


class Models:
    """Triton's model control over a stand-in stub table: a load starts a new stub; `dies_meanwhile` (a model)
    loses its stub while the first reload loads, as a second OOM kill might."""

    def __init__(self, stubs: dict[str, set[int]], dies_meanwhile: str) -> None:
        self.stubs = stubs
        self.dies_meanwhile = dies_meanwhile
        self.next_pid = 1000
        self.reloaded: list[str] = []

    def unload_model(self, model: str) -> None:
        self.stubs[model] = set()

    def load_model(self, model: str) -> None:
        self.next_pid += 1
        self.stubs[model] = {self.next_pid}
        if not self.reloaded:
            self.stubs[self.dies_meanwhile] = set()
        self.reloaded.append(model)


def test_a_stub_that_dies_while_another_model_reloads_is_reloaded_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before, the table read after the reload became the known one, and the mllm stub dead by then was never
    missed: the model stayed READY, failing every request, until Triton restarted."""
    stubs = {"omnigen2": {1}, "mllm": {2}, "vae_decoder": {3}}
    models = Models(stubs, dies_meanwhile="mllm")
    monkeypatch.setattr(watchdog, "stub_processes", lambda pid: {m: set(p) for m, p in stubs.items() if p})
    dog = StubWatchdog(SERVER_PID, "127.0.0.1:1")
    dog.client = models
    dog.known = watchdog.stub_processes(SERVER_PID)
    stubs["omnigen2"] = set()  # killed
    assert dog.check() == ["omnigen2"]
    assert dog.check() == ["mllm"]
    assert dog.check() == []
    assert models.reloaded == ["omnigen2", "mllm"]

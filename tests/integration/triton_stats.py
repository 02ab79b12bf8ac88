"""What Triton's own statistics say a model has run so far: the integration tests' proof that a call reached a model,
or was refused before it did, and that an abandoned one stopped."""

from __future__ import annotations

import time

from benchmarks.triton_stats import ModelStatistics, model_statistics
from serving.frontend.metrics_page import read_metrics, sample
from serving.triton.launcher import TritonServer


def model_counts(triton: TritonServer, model: str) -> ModelStatistics:
    """`model`'s executions (its calls) and inferences (the samples in them), and the rest Triton counts."""
    return model_statistics(triton.grpc_url, model)[model]


def executions(triton: TritonServer, model: str) -> int:
    return model_counts(triton, model).executions


def requests_running(triton: TritonServer, model: str = "omnigen2") -> float:
    """The requests `model` is working on (its gauge, serving/triton/stops.py: a request leaves it once its work has
    ended, before its final response)."""
    samples = read_metrics(f"http://127.0.0.1:{triton.ports.metrics}/metrics")
    return sample(samples, "omnigen2_requests_running", model=model) or 0.0


def assert_generation_stopped(triton: TritonServer, executions_before: int, steps: int, timeout_s: float = 20) -> None:
    """A generation of `steps` steps (each one transformer execution at least), its caller gone, and the transformer's
    executions read before it started: the BLS ended it before its last step, and the transformer ran nothing after.
    Waited for on the BLS's running gauge, not a fixed sleep: on a loaded machine the stop may take longer than any
    guess, and with the end observed the counts need no timing (a generation that went on would run every step)."""
    deadline = time.monotonic() + timeout_s
    while requests_running(triton) > 0:
        assert time.monotonic() < deadline, "the abandoned generation kept running in the BLS"
        time.sleep(0.05)
    # A step's transformer call may still be executing as the request leaves the gauge (Triton counts an execution
    # once it ends: CI saw one land in the second after), so the count is read once it has held for half a second.
    settled = executions(triton, "transformer")
    while True:
        time.sleep(0.5)
        now = executions(triton, "transformer")
        if now == settled:
            break
        assert time.monotonic() < deadline, "transformer calls went on after the BLS had stopped"
        settled = now
    assert settled - executions_before < steps, "the abandoned generation ran to its last step"
    time.sleep(1.0)
    assert executions(triton, "transformer") == settled, "a transformer call ran after the BLS had stopped"

"""The read gate's budgets as configured: the default follows admission's count, the other calls' stays small."""

from __future__ import annotations

from serving.frontend.config import FrontendConfig, MiB
from serving.frontend.metrics import Metrics
from serving.frontend.reading import OTHER_READS, ReadGate


def _gate(config: FrontendConfig) -> ReadGate:
    largest = 2 * config.max_request_bytes
    return ReadGate(frozenset(), config.held_request_budget(), largest, 1.0, 1.0, Metrics(), lambda *_: None)


def test_the_default_budget_reads_as_many_largest_requests_as_admission_admits() -> None:
    config = FrontendConfig()
    gate = _gate(config)
    assert gate.pools["uploads"].budget == config.max_in_flight * 2 * config.max_request_bytes
    assert gate.pools["other"].budget == OTHER_READS * 2 * config.max_request_bytes


def test_a_set_budget_is_kept_and_bounds_the_other_calls_too() -> None:
    gate = _gate(FrontendConfig(max_held_request_bytes=256 * MiB, max_request_bytes=64 * MiB))
    assert gate.pools["uploads"].budget == gate.pools["other"].budget == 256 * MiB

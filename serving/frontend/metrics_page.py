"""A Prometheus text page (the front end's /metrics, Triton's) read back as Prometheus reads it: for the tests, the
benchmarks and the soak, which check what the counters and gauges say."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

# (sample name, its labels sorted by name) -> value
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse_metrics(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return samples


def read_metrics(url: str, timeout_s: float = 5.0) -> Samples:
    with urllib.request.urlopen(url, timeout=timeout_s) as answer:
        return parse_metrics(answer.read().decode())


def sample(samples: Samples, name: str, **labels: str) -> float | None:
    """The sample `name` with exactly `labels`; None when absent (a labelled series appears on its first use)."""
    return samples.get((name, tuple(sorted(labels.items()))))


def total(samples: Samples, name: str, **labels: str) -> float | None:
    """The sum of `name`'s samples whose labels include `labels`, whatever their other labels; None when none."""
    found = [value for (seen, its), value in samples.items() if seen == name and labels.items() <= dict(its).items()]
    return sum(found) if found else None

"""The soak check (benchmarks/soak) for a few seconds against the shared stack: it exits 0 and every invariant
passes (gauges back to idle, admission at --max-in-flight, counters equal to access-log lines, probe pixels)."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.soak.__main__ import main
from serving.frontend.process import FrontendProcess
from serving.triton.launcher import LOOPBACK


def test_a_short_storm_leaves_every_invariant_holding(api: FrontendProcess, tmp_path: Path) -> None:
    flags = [
        f"--server={api.address}",
        f"--http={LOOPBACK}:{api.http_port}",
        f"--metrics=http://{LOOPBACK}:{api.metrics_port}/metrics",
        f"--access-log={api.log_path}",
        "--max-in-flight=8",  # the shared front end's (conftest.py)
        "--duration=12",
        "--concurrency=3",
        "--seed=7",
        f"--work={tmp_path / 'work'}",
        f"--out={tmp_path / 'out'}",
    ]
    status = main(flags)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    failed = {check["name"]: check["failures"] for check in results["checks"] if not check["passed"]}
    assert status == 0 and not failed, failed
    assert len(results["checks"]) == 6
    assert results["storm"]["calls"] > 0

"""The soak check (benchmarks/soak) for a few seconds on a stack of its own (`--start`: a storm has killed Triton
once in 4 long storms on this box, docs/reliability.md, and a dead shared Triton would fail the tests after it): it
exits 0 and every invariant passes (the storm as planned, gauges back to idle, admission at --max-in-flight,
counters equal to access-log lines, one line per call, probe pixels, the same processes)."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.soak.__main__ import main


def test_a_short_storm_leaves_every_invariant_holding(tiny_checkpoint: Path, tiny_onnx: Path, tmp_path: Path) -> None:
    flags = [
        "--start",
        f"--checkpoint={tiny_checkpoint}",
        f"--onnx-cache={tiny_onnx.parent}",  # the export the shared stack's repository is made from (conftest.py)
        "--max-in-flight=8",
        "--duration=12",
        "--concurrency=3",
        "--seed=7",
        f"--work={tmp_path / 'work'}",
        f"--out={tmp_path / 'out'}",
    ]
    status = main(flags)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    failed = {check["name"]: check["failures"] for check in results["checks"] if check["result"] != "PASS"}
    assert status == 0 and not failed, failed
    assert len(results["checks"]) == 7
    assert results["storm"]["calls"] > 0 and results["settings"]["started_stack"]

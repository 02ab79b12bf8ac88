"""The soak's results: calls by kind and outcome, then each invariant PASS/FAIL with what it saw (JSON + markdown)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.report import save_results
from benchmarks.soak.invariants import Check


def outcomes(calls: dict[str, dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per kind, how the client saw each call end ("client killed": its process was, mid-call)."""
    table: dict[str, Counter[str]] = {}
    for call in calls.values():
        seen = str(call["seen"]) if call["ended"] else "client killed"
        table.setdefault(call["kind"], Counter())[seen] += 1
    return {kind: dict(counts.most_common()) for kind, counts in sorted(table.items())}


def write(results: dict[str, Any], out: Path) -> None:
    save_results(out, results, markdown(results), json_newline=True)


def markdown(results: dict[str, Any]) -> str:
    machine, settings = results["machine"], results["settings"]
    hardware = f"{machine.get('cpu', 'CPU not recorded')} ({machine.get('bf16_isa', 'bf16 ISA not recorded')})"
    verdict = "PASS" if results["passed"] else "FAIL"
    lines = [
        f"# Soak `{verdict}`: {settings['duration_s']:.0f} s storm, seed {settings['seed']}",
        "",
        f"Machine: {hardware}, {machine['cpus']} CPUs, {machine['platform']}, Python {machine['python']}. "
        f"Commit: {results.get('commit', 'not recorded')}. Settings: `{settings}`.",
        f"Calls: {results['storm']['calls']}, clients killed mid-storm: {results['storm']['clients_killed']}, "
        f"worker errors: {len(results['storm']['worker_errors'])}.",
        "",
        "## Invariants",
        "",
        "| check | result | seen | failures |",
        "| --- | --- | --- | --- |",
    ]
    for check in results["checks"]:
        failures = "<br>".join(check["failures"]) or "-"
        lines.append(f"| {check['name']} | {check['result']} | `{json.dumps(check['seen'])}` | {failures} |")
    lines += ["", "## Calls by kind and client-seen outcome", "", "| kind | outcome | calls |", "| --- | --- | --- |"]
    for kind, counts in results["outcomes"].items():
        lines += [f"| {kind} | {seen} | {n} |" for seen, n in counts.items()]
    lines += [
        "",
        "Outcomes are what the client saw: a gRPC code, an HTTP status, `client-abort` (the client dropped the",
        "connection), `reset` (a raw request closed with a TCP reset), `client killed` (its process was SIGKILLed).",
        "Refusals (RESOURCE_EXHAUSTED, 429) are expected: the storm sends more than the stack admits.",
    ]
    return "\n".join(lines) + "\n"


def as_dicts(checks: list[Check]) -> list[dict[str, Any]]:
    return [{**vars(check), "result": check.result} for check in checks]

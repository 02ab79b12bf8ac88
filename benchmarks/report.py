"""The markdown table of a benchmark run, with every ratio taken against the eager baseline of the same run.

python -m benchmarks.report benchmarks/results/cpu-small ...   # rewrite results.md and plots from results.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.machine import describe
from benchmarks.percentiles import min_samples
from benchmarks.plots import plot_sweep


def tail_cell(point: dict[str, Any], key: str, q: float) -> str:
    """The cell of a percentile: '-' where the point has too few requests for it (older results stored one anyway)."""
    value = point.get(key)
    return f"{value:.3f}" if value is not None and point["requests"] >= min_samples(q) else "-"


def run_line(results: dict[str, Any]) -> str:
    """The hardware, the load beside it and the code: what a reader needs before comparing two results."""
    machine = results["machine"]
    load = machine.get("load_average")
    busy = (
        f"1-minute load average {load['start']:.1f} at the start, {load['end']:.1f} at the end"
        if load
        else "load average not recorded"
    )
    return (
        f"Machine: {describe(machine)}, {machine.get('platform', 'platform not recorded')}, "
        f"Python {machine.get('python', '?')}; {busy}. Commit: {results.get('commit', 'not recorded')}."
    )


def ratios(points: list[dict[str, Any]], baseline: str = "eager") -> list[dict[str, Any]]:
    """Per workload: served latency at concurrency 1 and throughput at the highest concurrency, vs `baseline`."""
    rows = []
    for eager in (p for p in points if p["mode"] == baseline):
        served = [p for p in points if p["mode"] == "served" and p["workload"] == eager["workload"]]
        if not served:
            continue
        single = min(served, key=lambda p: p["concurrency"])
        busiest = max(served, key=lambda p: p["concurrency"])
        rows.append(
            {
                "workload": eager["workload"],
                "latency_ratio": single["p50_s"] / eager["p50_s"],
                "overhead_ms": 1000 * (single["p50_s"] - eager["p50_s"]),
                "throughput_ratio": busiest["images_per_s"] / eager["images_per_s"],
                "at_concurrency": busiest["concurrency"],
            }
        )
    return rows


def save_results(out: Path, results: dict[str, Any], markdown: str, json_newline: bool = False) -> None:
    """What every benchmark leaves in `out`: results.json (`results`, indented) and results.md (`markdown`).
    `json_newline`: end the JSON with a newline, as the soak's results.json always has."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + ("\n" if json_newline else ""))
    (out / "results.md").write_text(markdown)


def write_markdown(results: dict[str, Any], path: Path) -> None:
    path.write_text(sweep_markdown(results))


def sweep_markdown(results: dict[str, Any]) -> str:
    """results.md of a `make bench` profile."""
    points = results["points"]
    raw = results.get("raw", [])
    lines = [
        f"# Benchmark `{results['profile']}`",
        "",
        f"{run_line(results)} Settings: `{results['settings']}`.",
        "",
    ]
    for baseline in dict.fromkeys(p["mode"] for p in points if p["mode"].startswith("eager")):
        lines += [
            f"## Against the `{baseline}` baseline (same run)",
            "",
            f"| workload | served / {baseline} p50 at concurrency 1 | served - {baseline} p50 | "
            f"served / {baseline} images/s | at |",
            "| --- | --- | --- | --- | --- |",
        ]
        for row in ratios(points, baseline):
            lines.append(
                f"| {row['workload']} | {row['latency_ratio']:.2f}x | {row['overhead_ms']:+.1f} ms | "
                f"{row['throughput_ratio']:.2f}x | {row['at_concurrency']} |"
            )
        lines.append("")
    lines += [
        "",
        "## Every point",
        "",
        "| mode | workload | concurrency | n (requests) | p50 s | p90 s | p99 s | max s | img/s | step ms | queue ms "
        "| peak MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for i, p in enumerate(points):
        queue = f"{p['queue_ms_p50']:.1f}" if p["queue_ms_p50"] is not None else "-"
        most = p.get("max_s", max(raw[i]["latencies_s"]) if len(raw) == len(points) else None)  # older: from raw
        lines.append(
            f"| {p['mode']} | {p['workload']} | {p['concurrency']} | {p['requests']} | {p['p50_s']:.3f} | "
            f"{tail_cell(p, 'p90_s', 90)} | {tail_cell(p, 'p99_s', 99)} | {'-' if most is None else f'{most:.3f}'} | "
            f"{p['images_per_s']:.2f} | {p['step_ms']:.1f} | {queue} | {p['peak_rss_mb']:.0f} |"
        )
    lines += [
        "",
        f"Percentiles rest on the point's n requests: p90 is given from {min_samples(90)} requests, p99 from "
        f"{min_samples(99)} ('-' below that; max is the slowest request).",
        "",
        "Peak RSS: served = the tritonserver process tree (server, component and BLS stubs) plus the front end;",
        "eager = the benchmark process holding the PyTorch pipeline (float32; `eager-bf16`: the same with bf16",
        "weights, what the served `pytorch-bf16` components compute). `queue` = a request's time outside the model",
        "stages (admission, transport, waiting for a model instance).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Rewrite a `make bench` profile's results.md and plots from its JSON.")
    parser.add_argument("folders", type=Path, nargs="+", help="benchmarks/results/<profile>")
    for folder in parser.parse_args(argv).folders:
        results = json.loads((folder / "results.json").read_text())
        write_markdown(results, folder / "results.md")
        plot_sweep(results, folder)


if __name__ == "__main__":
    main()

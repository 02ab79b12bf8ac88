"""The markdown table of a benchmark run, with every ratio taken against the eager baseline of the same run."""

from __future__ import annotations

from pathlib import Path
from typing import Any


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


def write_markdown(results: dict[str, Any], path: Path) -> None:
    points = results["points"]
    machine = results["machine"]
    lines = [
        f"# Benchmark `{results['profile']}`",
        "",
        f"Machine: {machine.get('cpu', 'CPU not recorded')} ({machine.get('bf16_isa', 'bf16 ISA not recorded')}), "
        f"{machine['cpus']} CPUs, {machine['platform']}, Python {machine['python']}. "
        f"Settings: `{results['settings']}`.",
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
        "| mode | workload | concurrency | requests | p50 s | p90 s | p99 s | img/s | step ms | queue ms | peak MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for p in points:
        queue = f"{p['queue_ms_p50']:.1f}" if p["queue_ms_p50"] is not None else "-"
        lines.append(
            f"| {p['mode']} | {p['workload']} | {p['concurrency']} | {p['requests']} | {p['p50_s']:.3f} | "
            f"{p['p90_s']:.3f} | {p['p99_s']:.3f} | {p['images_per_s']:.2f} | {p['step_ms']:.1f} | {queue} | "
            f"{p['peak_rss_mb']:.0f} |"
        )
    lines += [
        "",
        "Peak RSS: served = the tritonserver process tree (server, component and BLS stubs) plus the front end;",
        "eager = the benchmark process holding the PyTorch pipeline (float32; `eager-bf16`: the same with bf16",
        "weights, what the served `pytorch-bf16` components compute). `queue` = a request's time outside the model",
        "stages (admission, transport, waiting for a model instance).",
    ]
    path.write_text("\n".join(lines) + "\n")

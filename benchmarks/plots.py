"""PNG plots of a concurrency sweep: latency and throughput at each measured concurrency, eager as the reference line,
the machine in the title."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from benchmarks.machine import describe
from benchmarks.percentiles import min_samples

PLOTS = {
    "latency_vs_concurrency.png": ("p50_s", "latency p50 (s)"),
    "throughput_vs_concurrency.png": ("images_per_s", "images per second"),
}
MARKERS = "osD^v<>"


def swept_workloads(points: list[dict[str, Any]]) -> list[str]:
    """The workloads served at more than one concurrency: the only ones a sweep plot has something to show for."""
    served = [p["workload"] for p in points if p["mode"] == "served"]
    return [w for w in dict.fromkeys(served) if served.count(w) > 1]


def sweep_figure(results: dict[str, Any], metric: str, label: str) -> Figure:
    points = results["points"]
    machine = results["machine"]
    figure, axis = plt.subplots(figsize=(8.5, 4.4))
    measured: set[int] = set()
    for i, workload in enumerate(swept_workloads(points)):
        served = sorted(
            (p for p in points if p["mode"] == "served" and p["workload"] == workload), key=lambda p: p["concurrency"]
        )
        x = [p["concurrency"] for p in served]
        measured.update(x)
        # Markers only: a line from 1 to 8 would draw values at 2 and 4 that were not measured for most mixes.
        dots = axis.plot(
            x,
            [p[metric] for p in served],
            marker=MARKERS[i % len(MARKERS)],
            linestyle="none",
            label=f"served {workload}",
        )
        color = dots[0].get_color()
        tails = [p for p in served if metric == "p50_s" and p["requests"] >= min_samples(90)]
        if tails:  # p90 as a bar up from p50, only where the point has enough requests to place it
            axis.errorbar(
                [p["concurrency"] for p in tails],
                [p["p50_s"] for p in tails],
                yerr=[[0.0] * len(tails), [p["p90_s"] - p["p50_s"] for p in tails]],
                fmt="none",
                ecolor=color,
                capsize=3,
                alpha=0.6,
            )
        for eager in (p for p in points if p["mode"].startswith("eager") and p["workload"] == workload):
            style = "--" if eager["mode"] == "eager" else ":"
            axis.axhline(
                eager[metric], linestyle=style, color=color, label=f"{eager['mode']} {workload} (one at a time)"
            )
    axis.set_xscale("log", base=2)
    axis.set_xticks(sorted(measured), [str(c) for c in sorted(measured)])
    axis.minorticks_off()
    axis.set_xlabel("concurrent requests (measured points only)")
    axis.set_ylabel(label)
    tail = ", bar up to p90 where n >= 10" if metric == "p50_s" else ""
    where = f"{describe(machine)}\n{machine.get('platform', 'platform not recorded')}"
    axis.set_title(f"{results['profile']}: {label}{tail}\n{where}", fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the markers, not on them
    figure.tight_layout()
    return figure


def plot_sweep(results: dict[str, Any], out: Path) -> None:
    if not swept_workloads(results["points"]):
        return
    for filename, (metric, label) in PLOTS.items():
        figure = sweep_figure(results, metric, label)
        figure.savefig(out / filename, dpi=120)
        plt.close(figure)

"""PNG plots of a concurrency sweep: latency and throughput against concurrency, eager as the reference line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt


def plot_sweep(results: dict[str, Any], out: Path) -> None:
    points = results["points"]
    swept = [
        w
        for w in dict.fromkeys(p["workload"] for p in points)
        if len([p for p in points if p["mode"] == "served" and p["workload"] == w]) > 1
    ]
    if not swept:
        return
    for metric, label, filename in [
        ("p50_s", "latency p50 (s)", "latency_vs_concurrency.png"),
        ("images_per_s", "images per second", "throughput_vs_concurrency.png"),
    ]:
        figure, axis = plt.subplots(figsize=(8.5, 4))
        for workload in swept:
            served = sorted(
                (p for p in points if p["mode"] == "served" and p["workload"] == workload),
                key=lambda p: p["concurrency"],
            )
            line = axis.plot(
                [p["concurrency"] for p in served], [p[metric] for p in served], marker="o", label=f"served {workload}"
            )
            if metric == "p50_s":
                axis.fill_between(
                    [p["concurrency"] for p in served],
                    [p["p50_s"] for p in served],
                    [p["p90_s"] for p in served],
                    alpha=0.2,
                    color=line[0].get_color(),
                )
            for eager in (p for p in points if p["mode"].startswith("eager") and p["workload"] == workload):
                style = "--" if eager["mode"] == "eager" else ":"
                axis.axhline(
                    eager[metric], linestyle=style, color=line[0].get_color(), label=f"{eager['mode']} {workload}"
                )
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent requests")
        axis.set_ylabel(label)
        axis.set_title(f"{results['profile']}: {label}")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the lines, not on them
        figure.tight_layout()
        figure.savefig(out / filename, dpi=120)
        plt.close(figure)

"""`make bench BENCH_ARGS='--profile cpu-small-cache'`: what step caching buys in batched serving, and what it costs.

The `small` checkpoint at 256x256, text-to-image (two CFG branches), served by the ONNX Runtime stack: for 28 and
50 steps, `CONCURRENCY` requests at once with each cache mode (none, TeaCache 0.05, 0.1, 0.3, TaylorSeer), the same
seeds in every mode. Reported: p50 latency and images/s of each mode, its ratio to the uncached mode of the same
run, and the drift from the uncached result of the same seed (latents relative error, PSNR of the 8-bit images).
The weights are random, so the drift figures only indicate
the order of magnitude a real checkpoint would show.
Results: benchmarks/results/cpu-small-cache/{results.json, results.md, step_cache.png}.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from omnigen2 import AsyncOmniGen2Client, GenerationResult

from benchmarks.machine import RunStart, describe
from benchmarks.report import run_line, save_results
from benchmarks.served import served
from benchmarks.workloads import Workload
from serving.artifacts.repository import prepare_repository

SIZE = 256
STEPS = (28, 50)
CONCURRENCY = 8
MODES: dict[str, dict[str, Any]] = {
    "none": {"cache": "none"},
    "teacache-0.05": {"cache": "teacache", "teacache_threshold": 0.05},
    "teacache-0.1": {"cache": "teacache", "teacache_threshold": 0.1},
    # The random-weight small model's modulated input changes by ~0.1 relative per step (rescaled ~0.17), more than
    # the two thresholds above let pass: 0.3 shows what skipping does to a batched step.
    "teacache-0.3": {"cache": "teacache", "teacache_threshold": 0.3},
    "taylorseer": {"cache": "taylorseer"},
}


async def _batch(
    address: str, workload: Workload, options: dict[str, Any]
) -> tuple[list[tuple[GenerationResult, float]], float]:
    """CONCURRENCY requests at once (seeds 0..): each result with its latency, and the wall time of them all."""

    async def one(client: AsyncOmniGen2Client, seed: int) -> tuple[GenerationResult, float]:
        started = time.perf_counter()
        options_for_seed = workload.sdk_options(seed) | options | {"return_latents": True}
        result = await client.generate(workload.prompt, **options_for_seed)
        return result, time.perf_counter() - started

    async with AsyncOmniGen2Client(address, timeout=3600) as client:
        started = time.perf_counter()
        results = await asyncio.gather(*(one(client, seed) for seed in range(CONCURRENCY)))
        return list(results), time.perf_counter() - started


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _drift(results: list[GenerationResult], reference: list[GenerationResult]) -> dict[str, float]:
    errors, psnrs = [], []
    for mine, theirs in zip(results, reference, strict=True):
        assert mine.latents is not None and theirs.latents is not None
        a, b = mine.latents.numpy().astype(np.float64), theirs.latents.numpy().astype(np.float64)
        errors.append(float(np.linalg.norm(a - b) / np.linalg.norm(b)))
        psnrs.append(_psnr(np.asarray(mine.images[0]), np.asarray(theirs.images[0])))
    return {"latent_rel_error": statistics.median(errors), "psnr_db": statistics.median(psnrs)}


def run(checkpoint: Path, work: Path, out: Path) -> dict[str, Any]:
    repository = prepare_repository(checkpoint, work / "model_repository", onnx_cache=work.parent / "onnx")
    started = RunStart()
    points: list[dict[str, Any]] = []
    with served(repository, work, "--max-in-flight=64", "--metrics-port=0") as (_, api):
        for steps in STEPS:
            workload = Workload.make("t2i", "A red apple on a wooden table", SIZE, steps)
            asyncio.run(_batch(api.address, Workload.make("t2i", "warm", SIZE, 2), {}))  # sessions, caches
            reference: list[GenerationResult] = []
            for mode, options in MODES.items():
                timed, wall = asyncio.run(_batch(api.address, workload, options))
                generated = [result for result, _ in timed]
                reference = reference or generated
                latencies = [latency for _, latency in timed]
                point = {
                    "steps": steps,
                    "mode": mode,
                    "requests": len(generated),
                    "p50_s": statistics.median(latencies),
                    "images_per_s": len(generated) / wall,
                    "cache_ran": sorted({r.cache for r in generated}),
                } | _drift(generated, reference)
                points.append(point)
                print(json.dumps(point), flush=True)
    record = started.record()
    for point in points:
        base = next(p for p in points if p["steps"] == point["steps"] and p["mode"] == "none")
        point["throughput_vs_none"] = point["images_per_s"] / base["images_per_s"]
    results = {
        "profile": "cpu-small-cache",
        "settings": {"checkpoint": "small", "size": SIZE, "steps": list(STEPS), "concurrency": CONCURRENCY},
        **record,
        "points": points,
    }
    save_results(out, results, markdown(results))
    plot(results, out / "step_cache.png")
    return results


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "# Benchmark `cpu-small-cache`: step caching in batched serving",
        "",
        f"{run_line(results)} Settings: `{results['settings']}` (text-to-image, ONNX Runtime float32, random "
        "weights: the drift columns are indicative only).",
        "",
        "| steps | mode | p50 latency (s) | images/s | vs uncached | latents rel. error vs uncached "
        "| PSNR vs uncached (dB) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for p in results["points"]:
        lines.append(
            f"| {p['steps']} | {p['mode']} | {p['p50_s']:.2f} | {p['images_per_s']:.3f} | "
            f"{p['throughput_vs_none']:.2f}x | {p['latent_rel_error']:.2e} | {p['psnr_db']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 3.5))
    modes = list(MODES)
    width = 0.8 / len(STEPS)
    for k, steps in enumerate(STEPS):
        ratios = [
            next(p for p in results["points"] if p["steps"] == steps and p["mode"] == m)["throughput_vs_none"]
            for m in modes
        ]
        axis.bar([i + k * width for i in range(len(modes))], ratios, width, label=f"{steps} steps")
    axis.set_xticks([i + width * (len(STEPS) - 1) / 2 for i in range(len(modes))], modes)
    axis.axhline(1.0, color="grey", linewidth=0.8)
    axis.set_ylabel(f"images/s vs uncached (c={CONCURRENCY})")
    axis.set_title(f"Step caching, small model, {SIZE}x{SIZE}\n{describe(results['machine'])}", fontsize=9)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)

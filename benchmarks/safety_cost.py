"""`make bench BENCH_ARGS='--profile cpu-small-safety'`: what the output-image safety stage costs per request.

The `small` checkpoint at 256x256, 8 steps, text-to-image, served twice at once from two repositories that differ
only in the stage (off / on with the default thresholds); requests alternate between the two stacks so that the
machine's drift falls on both alike. Reported: p50 latency (and p90 from 10 requests up) of each at concurrency 1
and 4, their difference, and the BLS's own `safety` stage time per request (classifying its one finished image);
and, in this process, the classifier alone (letterbox, ONNX Runtime, decoding) per image at batch 1 and 8.
Results: benchmarks/results/cpu-small-safety/{results.json, results.md}.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
from omnigen2 import AsyncOmniGen2Client

from benchmarks.machine import RunStart
from benchmarks.percentiles import percentile
from benchmarks.report import run_line, save_results, tail_cell
from benchmarks.served import served
from benchmarks.workloads import Workload, standard_mixes
from serving.artifacts.repository import prepare_repository
from serving.runtime.ort_session import cpu_session
from serving.safety.detections import class_scores, decode, graph_input
from serving.safety.letterbox import letterbox
from serving.safety.settings import SIDE, SafetySettings, nudenet_graph

SIZE, STEPS = 256, 8
CONCURRENCY = (1, 4)
ROUNDS = 6  # per concurrency: each round sends `concurrency` requests to one stack, then to the other


async def _round(address: str, workload: Workload, concurrency: int, seed: int) -> list[tuple[float, float]]:
    """`concurrency` requests at once: (latency, safety stage seconds) of each."""

    async def one(client: AsyncOmniGen2Client, i: int) -> tuple[float, float]:
        started = asyncio.get_running_loop().time()
        result = await client.generate(workload.prompt, workload.images, **workload.sdk_options(seed=seed + i))
        return asyncio.get_running_loop().time() - started, result.timings["safety"]

    async with AsyncOmniGen2Client(address, timeout=3600) as client:
        return list(await asyncio.gather(*(one(client, i) for i in range(concurrency))))


def _summary(samples: list[tuple[float, float]]) -> dict[str, float | None]:
    latencies = [latency for latency, _ in samples]
    return {
        "p50_s": statistics.median(latencies),
        "p90_s": percentile(latencies, 90),  # None with fewer than 10 requests
        "safety_stage_ms_p50": 1000 * statistics.median(stage for _, stage in samples),
        "requests": len(samples),
    }


def classifier_ms_per_image(batch: int, repeats: int = 20) -> float:
    """The stage's work on `batch` 256x256 images in this process (what the component does, plus the BLS's
    letterbox), median milliseconds per image."""
    session = cpu_session(nudenet_graph())
    images = np.random.default_rng(0).integers(0, 256, (batch, SIZE, SIZE, 3), dtype=np.uint8)
    times = []
    for _ in range(repeats + 1):  # the first run warms the session up
        started = time.perf_counter()
        boxed = np.stack([letterbox(image, SIDE) for image in images])
        (output,) = session.run(None, {"images": graph_input(boxed)})
        _ = class_scores(output), [decode(o, SIZE, SIZE, SIDE, 32) for o in output]
        times.append((time.perf_counter() - started) / batch)
    return 1000 * statistics.median(times[1:])


def run(checkpoint: Path, work: Path, out: Path) -> dict[str, Any]:
    variants = {"without": None, "with": SafetySettings()}
    workload = standard_mixes(SIZE, STEPS)[0]  # t2i
    points: list[dict[str, Any]] = []
    started = RunStart()
    in_process = {f"batch_{n}_ms_per_image": classifier_ms_per_image(n) for n in (1, 8)}
    print(json.dumps(in_process), flush=True)
    with ExitStack() as stack:
        addresses = {}
        for name, safety in variants.items():
            repository = prepare_repository(
                checkpoint, work / name / "model_repository", onnx_cache=work.parent / "onnx", safety=safety
            )
            _, api = stack.enter_context(served(repository, work / name, "--max-in-flight=64", "--metrics-port=0"))
            addresses[name] = api.address
            asyncio.run(_round(api.address, workload, 1, seed=0))  # warm-up: sessions, caches
        for concurrency in CONCURRENCY:
            samples: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
            for r in range(ROUNDS):
                order = list(variants) if r % 2 == 0 else list(reversed(variants))
                for name in order:
                    samples[name] += asyncio.run(_round(addresses[name], workload, concurrency, seed=100 * r))
            for name in variants:
                point = {"safety": name, "concurrency": concurrency} | _summary(samples[name])
                points.append(point)
                print(json.dumps(point), flush=True)
        record = started.record()  # the load at the end taken with the stacks still up, as the points were
    results = {
        "profile": "cpu-small-safety",
        "settings": {"checkpoint": "small", "size": SIZE, "steps": STEPS, "rounds": ROUNDS, "workload": "t2i"},
        **record,
        "points": points,
        "classifier_in_process": in_process,
    }
    save_results(out, results, markdown(results))
    return results


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "# Benchmark `cpu-small-safety`: the output-image safety stage, off and on",
        "",
        f"{run_line(results)} Settings: `{results['settings']}`.",
        "",
        "| concurrency | n (requests each) | p50 without (s) | p50 with (s) | p50 difference (ms) | p90 without (s) "
        "| p90 with (s) | safety stage per request, p50 (ms) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for concurrency in sorted({p["concurrency"] for p in results["points"]}):
        off, on = (
            next(p for p in results["points"] if p["concurrency"] == concurrency and p["safety"] == name)
            for name in ("without", "with")
        )
        lines.append(
            f"| {concurrency} | {off['requests']} | {off['p50_s']:.3f} | {on['p50_s']:.3f} | "
            f"{1000 * (on['p50_s'] - off['p50_s']):+.0f} | {tail_cell(off, 'p90_s', 90)} | "
            f"{tail_cell(on, 'p90_s', 90)} | {on['safety_stage_ms_p50']:.1f} |"
        )
    alone = results.get("classifier_in_process")
    if alone:
        lines += [
            "",
            f"The classifier alone, in process (letterbox + ONNX Runtime + decoding, 256x256 images): "
            f"{alone['batch_1_ms_per_image']:.1f} ms per image at batch 1, {alone['batch_8_ms_per_image']:.1f} ms at "
            "batch 8.",
        ]
    return "\n".join(lines) + "\n"

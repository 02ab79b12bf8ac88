"""`make bench`: the served stack through the SDK against the eager in-process pipeline, in one run.

    python -m benchmarks.harness --profile cpu-small       # latency / throughput sweep on the `small` checkpoint
    python -m benchmarks.harness --profile cpu-small-bf16  # the same, served by the pytorch-bf16 repository
    python -m benchmarks.harness --profile overhead-tiny   # what the API + Triton add per request, on `tiny`
    python -m benchmarks.harness --profile cpu-small-safety  # p50 with and without the safety stage, on `small`
    python -m benchmarks.harness --profile cpu-small-cache  # step caching (TeaCache, TaylorSeer) at concurrency 8

Each point sends `requests` generations with `concurrency` of them in flight, and records p50 and max latency (p90
and p99 only where the point has enough requests to place them: 10 and 100), images per second, time per denoising
step and the peak memory of the processes involved. The eager pipeline
runs the same requests one after another in this process, in float32 like the reference: it is the baseline
every ratio is taken against. Profiles served in bf16 also run an `eager-bf16` pipeline (the same bf16 weights), so
that the gain of serving is shown apart from the gain of the arithmetic.
Results: benchmarks/results/<profile>/{results.json, results.md, *.png}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from omnigen2 import AsyncOmniGen2Client

from benchmarks import full_smoke, safety_cost, step_cache
from benchmarks.machine import RunStart
from benchmarks.memory import PeakMemory
from benchmarks.percentiles import percentile
from benchmarks.plots import plot_sweep
from benchmarks.report import save_results, sweep_markdown
from benchmarks.served import served
from benchmarks.workloads import Workload, standard_mixes
from export.make_checkpoint import make_checkpoint
from serving.artifacts.repository import prepare_repository
from serving.pipeline.eager import OmniGen2Pipeline

ROOT = Path(__file__).resolve().parents[1]
GOLDEN_TINY = ROOT.parent / "shared" / "golden" / "tiny-omnigen2"


@dataclass(frozen=True)
class Profile:
    checkpoint: str  # "small" (made here) or "tiny" (the golden one)
    size: int
    steps: int
    concurrency: tuple[int, ...]  # the sweep, on the first workload; the others at the ends of it
    requests_per_slot: int  # requests per point = max(min_requests, concurrency * this)
    min_requests: int
    mixes: bool  # all four request mixes, or text-to-image only
    backend: str = "onnxruntime"  # the repository backend (serving/artifacts/repository.py)
    precision: str = "fp32"


PROFILES = {
    "cpu-small": Profile("small", 256, 8, (1, 2, 4, 8), 4, 4, True),
    "cpu-small-bf16": Profile("small", 256, 8, (1, 2, 4, 8), 4, 4, True, backend="pytorch", precision="bf16"),
    "overhead-tiny": Profile("tiny", 32, 1, (1,), 1, 40, False),
}
FULL_SMOKE = "cpu-full-smoke"
SAFETY_COST = "cpu-small-safety"  # benchmarks/safety_cost.py; needs the `safety` extra
STEP_CACHE = "cpu-small-cache"  # benchmarks/step_cache.py


@dataclass
class Point:
    mode: str  # "served", "eager" (float32, the baseline) or "eager-bf16"
    workload: str
    concurrency: int
    requests: int
    latencies_s: list[float]
    step_s: list[float]  # per request: denoise seconds / steps
    queue_s: list[float]  # per request, served: time outside the model stages (front end, Triton, waiting)
    wall_s: float
    images: int
    peak_rss_mb: float

    def summary(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "workload": self.workload,
            "concurrency": self.concurrency,
            "requests": self.requests,  # the n every percentile below rests on
            "p50_s": statistics.median(self.latencies_s),
            "p90_s": percentile(self.latencies_s, 90),  # None with too few requests to place it
            "p99_s": percentile(self.latencies_s, 99),
            "max_s": max(self.latencies_s),
            "images_per_s": self.images / self.wall_s,
            "step_ms": 1000 * statistics.median(self.step_s),
            "queue_ms_p50": 1000 * statistics.median(self.queue_s) if self.queue_s else None,
            "peak_rss_mb": self.peak_rss_mb,
        }


async def served_point(address: str, workload: Workload, concurrency: int, requests: int, pids: list[int]) -> Point:
    latencies, steps, queues = [], [], []
    pending = iter(range(requests))

    async def worker(client: AsyncOmniGen2Client) -> None:
        for i in pending:
            started = time.perf_counter()
            result = await client.generate(workload.prompt, workload.images, **workload.sdk_options(seed=i))
            latencies.append(time.perf_counter() - started)
            steps.append(result.timings["denoise"] / workload.steps)
            queues.append(result.timings["queue"])

    with PeakMemory(pids) as peak:
        async with AsyncOmniGen2Client(address, timeout=3600) as client:
            started = time.perf_counter()
            await asyncio.gather(*(worker(client) for _ in range(concurrency)))
            wall = time.perf_counter() - started
    return Point(
        "served", workload.name, concurrency, requests, latencies, steps, queues, wall, requests, peak.bytes / 2**20
    )


def eager_point(mode: str, pipe: OmniGen2Pipeline, workload: Workload, requests: int) -> Point:
    latencies, steps = [], []
    with PeakMemory([os.getpid()], children=False) as peak:  # this process only: the served stack is its child
        started = time.perf_counter()
        for i in range(requests):
            began = time.perf_counter()
            result = pipe(workload.eager_request(seed=i))
            latencies.append(time.perf_counter() - began)
            steps.append(result.timings["denoise"] / workload.steps)
        wall = time.perf_counter() - started
    return Point(mode, workload.name, 1, requests, latencies, steps, [], wall, requests, peak.bytes / 2**20)


def checkpoint_for(size: str, work: Path) -> Path:
    """`tiny` is the golden checkpoint; other sizes are made (random weights) under `work` once."""
    if size == "tiny":
        return GOLDEN_TINY
    path = work / "checkpoints" / size
    if not (path / "model_index.json").is_file():
        make_checkpoint(size, path)
    return path


def run(name: str, profile: Profile, work: Path, out: Path) -> dict[str, Any]:
    started = RunStart()
    checkpoint = checkpoint_for(profile.checkpoint, work)
    repository = prepare_repository(
        checkpoint,
        work / name / "model_repository",
        profile.backend,
        onnx_cache=work / "onnx",
        precision=profile.precision,
    )
    size, steps = profile.size, profile.steps
    workloads = standard_mixes(size, steps) if profile.mixes else standard_mixes(size, steps)[:1]
    points: list[Point] = []
    with served(repository, work / name, "--max-in-flight=256", "--metrics-port=0") as (triton, api):
        assert triton.process is not None and api.process is not None
        pids = [triton.process.pid, api.process.pid]
        for i, workload in enumerate(workloads):
            sweep = profile.concurrency if i == 0 else sorted({profile.concurrency[0], profile.concurrency[-1]})
            asyncio.run(served_point(api.address, workload, 1, 1, pids))  # warm-up: sessions, caches
            for concurrency in sweep:
                requests = max(profile.min_requests, concurrency * profile.requests_per_slot)
                point = asyncio.run(served_point(api.address, workload, concurrency, requests, pids))
                points.append(point)
                print(json.dumps(point.summary()), flush=True)
        api.stop()  # the eager baselines run beside an idle Triton, without the front end (as they always have)
        baselines = {"eager": torch.float32} | ({"eager-bf16": torch.bfloat16} if profile.precision == "bf16" else {})
        for mode, dtype in baselines.items():
            pipe = OmniGen2Pipeline.from_pretrained(checkpoint, dtype=dtype)
            for workload in workloads:
                eager_point(mode, pipe, workload, 1)  # warm-up
                point = eager_point(mode, pipe, workload, profile.min_requests)
                points.append(point)
                print(json.dumps(point.summary()), flush=True)
    results = {
        "profile": name,
        "settings": asdict(profile),
        **started.record(),
        "points": [p.summary() for p in points],
        "raw": [asdict(p) for p in points],
    }
    save_results(out, results, sweep_markdown(results))
    plot_sweep(results, out)
    return results


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--profile",
        choices=[*sorted(PROFILES), FULL_SMOKE, SAFETY_COST, STEP_CACHE],
        action="append",
        help=f"default: all but {FULL_SMOKE} (benchmarks/full_smoke.py: 16 GB of weights)",
    )
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "bench")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    for name in args.profile or [*sorted(PROFILES), SAFETY_COST, STEP_CACHE]:
        if name == FULL_SMOKE:
            full_smoke.main(["--work", str(args.work / name), "--out", str(args.out / name)])
        elif name == SAFETY_COST:
            safety_cost.run(checkpoint_for("small", args.work), args.work / name, args.out / name)
        elif name == STEP_CACHE:
            step_cache.run(checkpoint_for("small", args.work), args.work / name, args.out / name)
        else:
            run(name, PROFILES[name], args.work, args.out / name)


if __name__ == "__main__":
    main()

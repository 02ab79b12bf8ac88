"""The storm: worker processes sharing the concurrency, one of them SIGKILLed every few seconds and replaced."""

from __future__ import annotations

import dataclasses
import json
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.soak.worker import WorkerConfig

ROOT = Path(__file__).resolve().parents[2]
KILL_EVERY_S = (3.0, 9.0)  # seeded: the same seed kills at the same moments
LAST_KILL_BEFORE_END_S = 4.0  # a replacement started later would barely run
PROGRESS_EVERY_S = 10


@dataclasses.dataclass
class StormSettings:
    seed: int
    seconds: float
    concurrency: int
    workers: int
    grpc: str
    http: str
    refs: Path
    out: Path  # a folder: one JSONL file per worker


def _shares(concurrency: int, workers: int) -> list[int]:
    workers = max(1, min(workers, concurrency))
    return [concurrency // workers + (i < concurrency % workers) for i in range(workers)]


def run_storm(settings: StormSettings, progress: Callable[[str], None]) -> dict[str, Any]:
    """Runs the storm to its end; returns the kills made and each worker's exit status. Call records are left in
    `settings.out`. However it ends (an exception, Ctrl-C, SIGTERM made SystemExit), no worker is left running."""
    settings.out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(settings.seed)
    spawned = 0
    started = time.monotonic()
    until = started + settings.seconds

    def spawn(tasks: int) -> tuple[subprocess.Popen[bytes], int, str]:
        nonlocal spawned
        spawned += 1
        name = f"soak{settings.seed}-w{spawned}"
        config = WorkerConfig(
            name=name,
            seed=f"{settings.seed}/w{spawned}",
            tasks=tasks,
            seconds=max(0.0, until - time.monotonic()),
            grpc=settings.grpc,
            http=settings.http,
            out=str(settings.out / f"{name}.jsonl"),
            refs=str(settings.refs),
        )
        command = [sys.executable, "-m", "benchmarks.soak.worker", json.dumps(dataclasses.asdict(config))]
        with (settings.out / f"{name}.err").open("wb") as errors:
            return subprocess.Popen(command, cwd=ROOT, stderr=errors), tasks, name

    live: list[tuple[subprocess.Popen[bytes], int, str]] = []
    exits: dict[str, int | None] = {}
    killed_at: dict[str, float] = {}  # worker name -> wall-clock time of its SIGKILL
    hung: list[str] = []
    try:
        live += [spawn(tasks) for tasks in _shares(settings.concurrency, settings.workers)]
        next_kill = time.monotonic() + rng.uniform(*KILL_EVERY_S)
        while time.monotonic() < until:
            time.sleep(min(1.0, max(0.0, until - time.monotonic())))
            now = time.monotonic()
            if now >= next_kill and now < until - LAST_KILL_BEFORE_END_S:
                victim, tasks, name = live.pop(rng.randrange(len(live)))
                killed_at[name] = time.time()
                victim.send_signal(signal.SIGKILL)
                exits[name] = victim.wait()
                live.append(spawn(tasks))
                next_kill = now + rng.uniform(*KILL_EVERY_S)
            if int(now - started) % PROGRESS_EVERY_S == 0:
                progress(f"storm {now - started:4.0f} s of {settings.seconds:.0f} s, {len(killed_at)} clients killed")
        while live:
            process, _, name = live[0]
            try:
                exits[name] = process.wait(timeout=120)  # a worker ends once its calls in flight have
            except subprocess.TimeoutExpired:
                hung.append(name)  # not in killed_at: its -9 and its unfinished calls fail the storm check
                process.kill()
                exits[name] = process.wait()
            live.pop(0)
    finally:
        for process, _, name in live:
            process.kill()
            exits[name] = process.wait()
    return {
        "clients_killed": len(killed_at),
        "killed_at": killed_at,
        "workers_started": spawned,
        "exits": exits,
        "hung_workers": hung,
    }


def read_calls(folder: Path, killed_at: dict[str, float]) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Every call by id (its start record, updated by its end record when it ended: `t` is then its end, `started`
    its start; a call cut by its worker's SIGKILL ends at the kill, `killed`) and the worker errors."""
    calls: dict[str, dict[str, Any]] = {}
    errors: list[dict[str, Any]] = []
    for path in sorted(folder.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            if not line.endswith("}"):
                continue  # the last line of a killed worker may be cut
            record = json.loads(line)
            if record["event"] == "worker-error":
                errors.append(record)
            elif record["event"] == "start":
                calls[record["id"]] = {**record, "started": record["t"], "ended": False}
            else:
                calls[record["id"]].update(record, ended=True)
    for call in calls.values():
        if not call["ended"] and call["worker"] in killed_at:
            call.update(t=killed_at[call["worker"]], killed=True)
    return calls, errors

"""Soak / chaos check: a seeded storm of random calls against a running stack, then its invariants.

    python -m benchmarks.soak --server 127.0.0.1:50051 --http 127.0.0.1:8080 --metrics http://127.0.0.1:9090/metrics \
        --access-log build/serve.log --duration 120 --concurrency 4 --max-in-flight 16
    python -m benchmarks.soak --start --duration 120       # its own stack (tiny checkpoint) on free loopback ports

The storm mixes unary Generate, GenerateStream, Understand, edits with input images, HTTP image and chat calls
(streamed or not), each with at most one fault: a short deadline, a cancel (or dropped connection) at a random
moment, a stream left after a few events; a raw HTTP request closed with a TCP reset; and every few seconds a client
process SIGKILLed mid-calls. Probes (fixed seeded requests) run in it too. Then, once idle: every in-flight and budget
gauge at 0, --max-in-flight calls admitted at once on each API, the request counters equal to the access-log lines
(and one line per call, with a status that fits what its client saw), the probes' pixels as alone (to 1 level), the
same processes with their memory; and that the storm itself ran as planned. A check with nothing to check (no
access log, no stack process found locally) is a SKIP. Results: <out>/results.{json,md}; exit status 1 when an
invariant fails. --seed repeats a run's mix, kills and faults (not its timing: which calls the stack refuses depends
on the machine). SIGTERM ends it as Ctrl-C does: workers killed, a --start stack stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from benchmarks.machine import commit, machine_info
from benchmarks.soak import results as report
from benchmarks.soak import stack
from benchmarks.soak.invariants import (
    CALL_LINES,
    Check,
    check_admission,
    check_call_lines,
    check_counters,
    check_idle,
    check_probes,
    check_processes,
    check_storm,
    parse_access_log,
    skip,
)
from benchmarks.soak.storm import ROOT, StormSettings, read_calls, run_storm
from serving.frontend.metrics_page import read_metrics

SETTLE_S = 1.0  # after the gauges read idle: the last access-log lines are written as the calls' handlers return


@contextlib.contextmanager
def own_stack(checkpoint: Path, work: Path, onnx_cache: Path, max_in_flight: int) -> Iterator[argparse.Namespace]:
    """A stack of its own on free loopback ports, started as the other benchmarks start one (benchmarks/served.py),
    with the HTTP API on; yields the addresses the soak takes as flags."""
    from benchmarks.served import served
    from serving.artifacts.repository import prepare_repository
    from serving.triton.ports import LOOPBACK

    started = time.monotonic()
    repository = prepare_repository(checkpoint, work / "model_repository", onnx_cache=onnx_cache)
    with served(repository, work, f"--max-in-flight={max_in_flight}", http=True, health_s=120) as (_, api):
        progress(f"own stack serving after {time.monotonic() - started:.1f} s")
        yield argparse.Namespace(
            server=api.address,
            http=f"{LOOPBACK}:{api.http_port}",
            metrics=f"http://{LOOPBACK}:{api.metrics_port}/metrics",
            access_log=api.log_path,
        )


@contextlib.contextmanager
def sigterm_exits() -> Iterator[None]:
    """SIGTERM (`timeout make soak`, a CI job's end) raises SystemExit, so that the finally blocks and context
    managers run: the workers are killed and a --start stack's tritonserver (its own session) and front end stopped."""

    def leave(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, leave)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def progress(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", flush=True)


def soak(args: argparse.Namespace, where: argparse.Namespace) -> dict[str, Any]:
    http = where.http if where.http.startswith("http") else f"http://{where.http}"
    work = args.work / f"seed{args.seed}-{int(time.time())}"
    work.mkdir(parents=True, exist_ok=True)
    code = commit()  # before the storm: the tree may move on while it runs
    refs = work / "probes.npz"
    progress("probe references, each alone")
    stack.probe_references(where.server, refs)
    before, waited = stack.wait_idle(where.metrics, args.idle_timeout_s)
    if waited > args.idle_timeout_s:
        progress(f"warning: the stack was not idle before the storm ({waited:.0f} s)")
    log = stack.AccessLog(Path(where.access_log)) if where.access_log else None
    rss_before = stack.stack_rss(where.server)
    progress(f"storm: {args.duration:.0f} s at concurrency {args.concurrency}, seed {args.seed}")
    settings = StormSettings(
        args.seed, args.duration, args.concurrency, args.workers, where.server, http, refs, work / "calls"
    )
    storm = run_storm(settings, progress)
    progress("storm over; waiting for the gauges to read idle")
    after, waited = stack.wait_idle(where.metrics, args.idle_timeout_s)
    time.sleep(SETTLE_S)
    after = read_metrics(where.metrics, timeout_s=10)
    lines = parse_access_log(log.new_lines()) if log else None
    rss_after = stack.stack_rss(where.server)
    calls, errors = read_calls(settings.out, storm["killed_at"])
    progress(f"call records: {settings.out}")
    checks: list[Check] = [check_storm(storm["exits"], storm["killed_at"], errors, calls), check_idle(after, waited)]
    progress(f"admission: {args.max_in_flight} calls at once on each API")
    checks.append(
        check_admission(args.max_in_flight, *stack.admission_at_full_width(where.server, http, args.max_in_flight))
    )
    if lines is not None:
        checks += [check_counters(before, after, lines), check_call_lines(calls, lines)]
    else:
        checks += [skip(name, "no --access-log") for name in ("request counters equal access-log lines", CALL_LINES)]
    progress("probes again, each alone")
    during = [call["max_diff"] for call in calls.values() if "max_diff" in call]
    checks.append(check_probes(during, stack.probes_after(where.server, refs), args.probe_tolerance))
    checks.append(check_processes(rss_before, rss_after, args.max_rss_growth))
    settings_out = {
        "seed": args.seed,
        "duration_s": args.duration,
        "concurrency": args.concurrency,
        "workers": args.workers,
        "max_in_flight": args.max_in_flight,
        "started_stack": args.start,
        "access_log": lines is not None,
    }
    return {
        "passed": all(check.passed for check in checks),
        "commit": code,
        "settings": settings_out,
        "machine": machine_info(),
        "storm": {**storm, "calls": len(calls), "worker_errors": errors[:20]},
        "outcomes": report.outcomes(calls),
        "checks": report.as_dicts(checks),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", help="the front end's gRPC address, host:port")
    parser.add_argument("--http", help="the OpenAI-compatible HTTP API, host:port")
    parser.add_argument("--metrics", help="the front end's /metrics URL")
    parser.add_argument(
        "--access-log",
        type=Path,
        help="the front end's log (omnigen2.access lines); without it the log checks are skipped",
    )
    parser.add_argument("--start", action="store_true", help="start a stack of its own (tiny checkpoint, free ports)")
    parser.add_argument("--checkpoint", type=Path, default=ROOT.parent / "shared" / "golden" / "tiny-omnigen2")
    parser.add_argument("--onnx-cache", type=Path, help="--start's ONNX export folder (default: under --work)")
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of storm")
    parser.add_argument("--concurrency", type=int, default=4, help="calls in flight at once, over all clients")
    parser.add_argument("--workers", type=int, default=2, help="client processes (one is killed every 3-9 s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-in-flight", type=int, default=16, help="the front end's --max-in-flight")
    parser.add_argument("--idle-timeout-s", type=float, default=30.0, help="how long the gauges may take to read 0")
    parser.add_argument("--probe-tolerance", type=int, default=1, help="pixel levels (of 255) a probe may move")
    parser.add_argument("--max-rss-growth", type=float, default=1.5, help="the stack's total RSS, after / before")
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "soak")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "soak")
    args = parser.parse_args(argv)
    if not args.start and not (args.server and args.http and args.metrics):
        parser.error("give --server, --http and --metrics of a running stack, or --start")
    onnx_cache = args.onnx_cache or args.work / "stack" / "onnx"
    with sigterm_exits(), contextlib.ExitStack() as stack_context:
        where = (
            stack_context.enter_context(own_stack(args.checkpoint, args.work / "stack", onnx_cache, args.max_in_flight))
            if args.start
            else args
        )
        results = soak(args, where)
    report.write(results, args.out)
    for check in results["checks"]:
        progress(f"{check['result']}  {check['name']}  {'; '.join(check['failures'][:3])}")
    progress(f"results: {args.out / 'results.md'}")
    return 0 if results["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

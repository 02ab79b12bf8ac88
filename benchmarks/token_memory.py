"""Transformer memory per sample token, the measurement behind the front end's token budgets (issue 19).

    python -m benchmarks.token_memory [--sides 512 768 1024 1280] [--checkpoint DIR]

Serves the checkpoint (golden tiny by default) with the default `onnxruntime` backend, then generates one sample
per size (one step, text guidance 1: a single CFG branch, n = 1, max_pixels = the size) and reads the transformer
stub's peak resident memory for that request alone (the kernel's high-water mark, reset before each through
/proc/PID/clear_refs, which needs root or the same user). Attention memory grows with the square of a sample's
tokens, so the result is fitted as bytes x tokens^2 and written to benchmarks/results/token-memory/.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from omnigen2 import OmniGen2Client

from benchmarks.machine import RunStart
from benchmarks.proc_memory import proc_status_kib, reset_peak
from benchmarks.served import served
from serving.artifacts.repository import prepare_repository
from serving.triton.launcher import TritonServer
from serving.triton.watchdog import stub_processes

ROOT = Path(__file__).resolve().parents[1]
MiB = 1024**2


def _stub_pid(triton: TritonServer, model: str) -> int:
    assert triton.process is not None
    (pid,) = stub_processes(triton.process.pid)[model]  # one instance: the transformer keeps step-cache state
    return pid


def measure(checkpoint: Path, sides: list[int], work: Path) -> list[dict[str, Any]]:
    repository = prepare_repository(checkpoint, work / "model_repository", onnx_cache=work / "onnx")
    points = []
    # Budgets out of the way: this measures what they are set from.
    flags = ("--max-sample-tokens=1000000", "--max-step-tokens=1000000", "--max-request-tokens=100000000")
    with served(repository, work / "triton", *flags) as (triton, api):
        client = OmniGen2Client(api.address, timeout=3600, retries=0)
        stub = _stub_pid(triton, "transformer")
        for side in sides:
            time.sleep(2)  # the stub trims its heap a second after its last call
            idle = proc_status_kib(stub, "VmRSS")
            reset_peak(stub)
            started = time.perf_counter()
            client.generate(
                "A measured cat", width=side, height=side, steps=1, text_guidance_scale=1.0, seed=1,
                max_pixels=side * side,
            )  # fmt: skip
            peak = proc_status_kib(stub, "VmHWM")
            tokens = (side // 16) ** 2
            points.append(
                {
                    "side": side,
                    "image_tokens": tokens,
                    "seconds": time.perf_counter() - started,
                    "idle_mib": idle / 1024,
                    "peak_above_idle_mib": (peak - idle) / 1024,
                    "bytes_per_token_squared": (peak - idle) * 1024 / tokens**2,
                }
            )
            print(json.dumps(points[-1]), flush=True)
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=ROOT.parent / "shared" / "golden" / "tiny-omnigen2")
    parser.add_argument("--sides", type=int, nargs="+", default=[512, 768, 1024, 1280])
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "token-memory")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "token-memory")
    args = parser.parse_args()
    started = RunStart()
    points = measure(args.checkpoint, args.sides, args.work)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {**started.record(), "checkpoint": str(args.checkpoint), "backend": "onnxruntime", "points": points}
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

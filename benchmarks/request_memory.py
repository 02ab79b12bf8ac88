"""Peak RSS of the gRPC front end while K callers each upload a large GenerateRequest at once.

`python -m benchmarks.request_memory --uploads 8 --mib 100 [-- FRONT-END FLAGS]`. The front end runs without
Triton (the uploads are over --max-request-bytes, so each ends INVALID_ARGUMENT once read, or RESOURCE_EXHAUSTED
unread past --max-held-request-bytes); its peak (VmHWM) is reset once it is idle. Health is probed from another
process throughout. `--root` runs another checkout's front end (an older commit, for a before/after).
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
from omnigen2.v1 import omnigen2_pb2 as pb
from omnigen2.v1 import omnigen2_pb2_grpc as pb_grpc

from benchmarks.proc_memory import proc_status_kib, reset_peak
from serving import health_probe
from serving.triton.ports import LOOPBACK, free_port

MiB = 1024 * 1024
PROBE = """
import sys, time, grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
slowest, end = 0.0, time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    with grpc.insecure_channel(sys.argv[1]) as channel:
        start = time.monotonic()
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
        slowest = max(slowest, time.monotonic() - start)
    time.sleep(0.05)
print(f"{slowest:.2f}")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--uploads", type=int, default=8)
    parser.add_argument("--mib", type=int, default=100, help="each request's input image, MiB")
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("flags", nargs="*", help="front-end flags, after --")
    args = parser.parse_args()
    address = f"{LOOPBACK}:{free_port()}"
    command = [sys.executable, "-m", "serving.frontend.server", f"--listen={address}", "--triton-url=127.0.0.1:1"]
    command += ["--metrics-port=0", "--no-warmup", *args.flags]
    frontend = subprocess.Popen(command, cwd=args.root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                health_probe.status(address, timeout_s=2)  # any answer: NOT_SERVING without Triton
                break
            except grpc.RpcError:
                time.sleep(0.1)
        idle = proc_status_kib(frontend.pid, "VmRSS") // 1024
        reset_peak(frontend.pid)
        request = pb.GenerateRequest(prompt="x", input_images=[pb.Image(data=os.urandom(args.mib * MiB))])
        options = [("grpc.max_send_message_length", 2 * request.ByteSize()), ("grpc.use_local_subchannel_pool", 1)]
        codes: list[str] = []

        def upload() -> None:
            with grpc.insecure_channel(address, options=options) as channel:
                try:
                    pb_grpc.OmniGen2Stub(channel).Generate(request, timeout=120)
                    codes.append("OK")
                except grpc.RpcError as exc:
                    codes.append(exc.code().name)

        probe = subprocess.Popen([sys.executable, "-c", PROBE, address, "6"], stdout=subprocess.PIPE, text=True)
        time.sleep(0.5)
        threads = [threading.Thread(target=upload) for _ in range(args.uploads)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        slowest = probe.communicate()[0].strip()
        peak = proc_status_kib(frontend.pid, "VmHWM") // 1024
        print(
            f"{args.uploads} x {args.mib} MiB, flags {args.flags}: idle {idle} MiB, peak {peak} MiB "
            f"(+{peak - idle}), {dict(collections.Counter(codes))}, slowest health probe {slowest} s"
        )
    finally:
        frontend.terminate()
        frontend.wait()


if __name__ == "__main__":
    main()

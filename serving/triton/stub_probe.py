"""`python -m serving.triton.stub_probe [--address 127.0.0.1:8001] [--server-pid PID]`: the Triton container's
liveness. Exit 0 while Triton's health service answers SERVING and every ready Python-backend model has a live stub
process; 1 otherwise, saying which.

Triton (2.51, measured) keeps a Python-backend model whose stub process died READY, and its health SERVING, while it
fails every request to that model ("Stub process ... is not healthy"). Where `make serve` runs Triton, the launcher's
watchdog loads such a model again (serving/triton/watchdog.py); in a container whose command is `tritonserver`
(deploy/) nothing does, so the liveness probe must see it: failing, it has the container restarted, which loads every
model again. A model with several instances (one per GPU) that lost only some of them still has a stub and passes.
Needs the container's process list (/proc), so it runs inside it, as the probes there do.
"""

from __future__ import annotations

import argparse
import sys

import tritonclient.grpc as triton_grpc
from tritonclient.utils import InferenceServerException

from serving.health_probe import serving
from serving.triton.leftovers import is_live_server
from serving.triton.watchdog import processes, stub_processes


class ProbeError(RuntimeError):
    pass


def server_pid() -> int:
    """The one `tritonserver` process this probe can see (the container's)."""
    found = [pid for pid, stat, _ in processes() if is_live_server(stat)]
    if len(found) != 1:
        raise ProbeError(f"expected one tritonserver process, found {len(found)}: pass --server-pid")
    return found[0]


def models_without_stubs(address: str, server: int) -> list[str]:
    """The ready Python-backend models of the server at `address` (process `server`) that have no live stub."""
    client = triton_grpc.InferenceServerClient(address)
    try:
        ready = [model.name for model in client.get_model_repository_index().models if model.state == "READY"]
        live = stub_processes(server)
        return [
            name for name in ready if not live.get(name) and client.get_model_config(name).config.backend == "python"
        ]
    finally:
        client.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", default="127.0.0.1:8001", help="Triton's gRPC address")
    parser.add_argument("--server-pid", type=int, help="the tritonserver process (default: the only one seen)")
    parser.add_argument("--timeout-s", type=float, default=3.0, help="for the health call")
    args = parser.parse_args(argv)
    if not serving(args.address, timeout_s=args.timeout_s):
        print(f"Triton at {args.address} is not SERVING")
        return 1
    try:
        missing = models_without_stubs(args.address, args.server_pid or server_pid())
    except (InferenceServerException, ProbeError) as exc:
        print(f"stub check failed: {exc}")
        return 1
    if missing:
        print(f"model(s) {', '.join(missing)} READY with no live stub process: their requests fail until reloaded")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

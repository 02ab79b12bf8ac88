"""`python -m serving.health_probe [--address 127.0.0.1:50051] [--service NAME]`: exit 0 when the gRPC health
service (grpc.health.v1) answers SERVING, 1 otherwise.

The containers' HEALTHCHECK, for Docker and compose, which have no gRPC probe of their own (Kubernetes has: the
manifests in deploy/k8s use its `grpc:` probes against the same services). It speaks to the front end
(service omnigen2.v1.OmniGen2: SERVING while Triton and the model are ready) and to Triton's own health service.
Only grpcio and grpcio-health-checking: the front-end image has both.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def status(
    address: str, service: str = "", timeout_s: float = 3.0, credentials: grpc.ChannelCredentials | None = None
) -> int:
    """What the health service at `address` answers for `service` (TLS with `credentials`); grpc.RpcError when it
    does not answer."""
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    with channel:
        request = health_pb2.HealthCheckRequest(service=service)
        return int(health_pb2_grpc.HealthStub(channel).Check(request, timeout=timeout_s).status)


def serving(
    address: str, service: str = "", timeout_s: float = 3.0, credentials: grpc.ChannelCredentials | None = None
) -> bool:
    try:
        return status(address, service, timeout_s, credentials) == int(health_pb2.HealthCheckResponse.SERVING)
    except grpc.RpcError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", default="127.0.0.1:50051")
    parser.add_argument("--service", default="", help='"" for the whole server')
    parser.add_argument("--timeout-s", type=float, default=3.0)
    args = parser.parse_args(argv)
    return 0 if serving(args.address, args.service, args.timeout_s) else 1


if __name__ == "__main__":
    sys.exit(main())

"""The front end's event loop answers small calls while large requests are parsed (serving/frontend/reading.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2
from omnigen2.v1 import omnigen2_pb2 as pb

from serving.frontend.process import FrontendProcess
from serving.triton.launcher import TritonServer

MiB = 1024 * 1024
UPLOADS = 8
UPLOAD = 100 * MiB  # over the default --max-request-bytes (64 MiB): read whole, parsed, then refused naming its field
# Generous, not a speed test: on a shared 2-core machine the worst wait was 0.7-1.0 s, and 1.1-3.2 s before (the
# loop parsed each upload and read its image bytes for the access log). The rest is grpcio's own: it copies each
# message out of its buffers on the loop, about 0.1 s per 100 MiB, and uploads that arrive together add up.
BOUND_S = 2.0
STAGGER_S = 0.3  # one after another, in flight together: not all arriving at the same instant
PROBE_S = 8.0  # the probes run this long from the uploads' start: past their end
# Health checks and GetModelInfo calls, one after the other, each timed; prints "ready" once both have answered,
# then after PROBE_S their times as JSON.
PROBE = """
import json, sys, time, grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from omnigen2.v1 import omnigen2_pb2 as pb, omnigen2_pb2_grpc as pb_grpc
waits = {"health": [], "GetModelInfo": []}
with grpc.insecure_channel(sys.argv[1]) as one, grpc.insecure_channel(sys.argv[1]) as other:
    health, info = health_pb2_grpc.HealthStub(one), pb_grpc.OmniGen2Stub(other)
    calls = {
        "health": lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=30),
        "GetModelInfo": lambda: info.GetModelInfo(pb.GetModelInfoRequest(), timeout=30),
    }
    for call in calls.values():
        call()
    print("ready", flush=True)
    end = time.monotonic() + float(sys.argv[2])
    while time.monotonic() < end:
        for name, call in calls.items():
            start = time.monotonic()
            call()
            waits[name].append(time.monotonic() - start)
        time.sleep(0.02)
print(json.dumps(waits))
"""
GENERATE = f"/{pb.DESCRIPTOR.services_by_name['OmniGen2'].full_name}/Generate"
OPTIONS = [("grpc.max_send_message_length", 2 * UPLOAD), ("grpc.use_local_subchannel_pool", 1)]  # own connections


@pytest.fixture(scope="module")
def frontend(tmp_path_factory: pytest.TempPathFactory, triton: TritonServer) -> Iterator[FrontendProcess]:
    log = tmp_path_factory.mktemp("loop-responsive") / "frontend.log"
    with FrontendProcess(triton.grpc_url, log) as process:
        process.wait_health(health_pb2.HealthCheckResponse.SERVING)
        yield process


def test_health_and_model_info_answer_while_large_uploads_are_parsed(frontend: FrontendProcess) -> None:
    """8 uploads of 100 MiB, sent serialized already (the default budget reads them all at once): a health check and
    GetModelInfo, each on a connection of its own, answer within BOUND_S throughout. They are timed from a process
    of their own, as a kubelet's would be: in this one, the uploads' copies into gRPC hold its GIL."""
    payload = pb.GenerateRequest(prompt="x", input_images=[pb.Image(data=os.urandom(UPLOAD))]).SerializeToString()
    probe = subprocess.Popen(
        [sys.executable, "-c", PROBE, frontend.address, str(PROBE_S)], stdout=subprocess.PIPE, text=True
    )
    assert probe.stdout is not None and probe.stdout.readline() == "ready\n"
    codes: list[grpc.StatusCode] = []

    def upload(index: int) -> None:
        time.sleep(index * STAGGER_S)
        with grpc.insecure_channel(frontend.address, options=OPTIONS) as channel:
            try:
                channel.unary_unary(GENERATE)(payload, timeout=60)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(UPLOADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    waits = json.loads(probe.communicate(timeout=PROBE_S + 60)[0])
    assert codes == [grpc.StatusCode.INVALID_ARGUMENT] * UPLOADS  # each was read whole and parsed
    for name, seen in waits.items():
        assert len(seen) >= 3 and max(seen) < BOUND_S, f"{name} waited {[round(s, 2) for s in seen]} s"


def test_a_large_malformed_request_is_invalid_argument(frontend: FrontendProcess) -> None:
    """Parsed in a worker thread, bytes that are not a message still end INVALID_ARGUMENT naming the request."""
    with grpc.insecure_channel(frontend.address, options=OPTIONS) as channel, pytest.raises(grpc.RpcError) as error:
        channel.unary_unary(GENERATE)(b"\xff" * (2 * MiB), timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid Generate request" in str(error.value.details())

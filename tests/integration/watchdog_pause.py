"""The shared Triton server with its stub watchdog paused, for tests that take a model away on purpose (unload it,
kill its stub) and must see what happens before anything brings it back."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import tritonclient.grpc as triton_grpc
from grpc_health.v1 import health_pb2

from serving.frontend.process import FrontendProcess
from serving.triton.launcher import TritonServer
from serving.triton.watchdog import StubWatchdog, stub_processes


@contextlib.contextmanager
def watchdog_paused(
    triton: TritonServer, api: FrontendProcess, model: str
) -> Iterator[triton_grpc.InferenceServerClient]:
    """Yields a client of the server's model control. Afterwards, however the test ended: `model` loaded again, its
    old stubs gone (else the watchdog's first list would hold them, and it would reload the model in a later test),
    the watchdog back, and the shared front end SERVING for the tests after this one."""
    assert triton.process is not None and triton.watchdog is not None
    server = triton.process.pid
    before = stub_processes(server)[model]
    triton.watchdog.stop()
    admin = triton_grpc.InferenceServerClient(triton.grpc_url)
    try:
        yield admin
    finally:
        try:
            admin.unload_model(model)
            admin.load_model(model)
            deadline = time.monotonic() + 30
            while stub_processes(server)[model] & before and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            triton.watchdog = StubWatchdog(server, triton.grpc_url).start()
            admin.close()
        api.wait_health(health_pb2.HealthCheckResponse.SERVING, timeout=60)

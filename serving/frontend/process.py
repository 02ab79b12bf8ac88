"""The API front end as a child process (as deployed), pointed at a Triton server: for tests and benchmarks."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import grpc
from grpc_health.v1 import health_pb2

from serving import health_probe
from serving.frontend.metrics_page import Samples, read_metrics, sample
from serving.triton.ports import LOOPBACK, free_port


class FrontendProcess:
    def __init__(
        self, triton_url: str, log_path: Path, *flags: str, tls_root: bytes | None = None, http: bool = False
    ) -> None:
        self.tls_root = tls_root  # the server's certificate, when it speaks TLS
        self.port = free_port()
        self.metrics_port = free_port()
        self.http_port = free_port() if http else 0  # the OpenAI-compatible HTTP API, when asked for
        self.log_path = log_path
        self.command = [
            sys.executable,
            "-m",
            "serving.frontend.server",
            f"--listen={LOOPBACK}:{self.port}",
            f"--triton-url={triton_url}",
            f"--metrics-port={self.metrics_port}",
            "--health-interval-s=0.2",
            *([f"--http-listen={LOOPBACK}:{self.http_port}"] if http else []),
            *flags,
        ]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def http_url(self) -> str:
        """The OpenAI-compatible API's base URL, as OpenAI clients take it."""
        return f"http://{LOOPBACK}:{self.http_port}/v1"

    def health(self, service: str = "") -> int:
        """Its health status for `service`; grpc.RpcError when it does not answer."""
        credentials = grpc.ssl_channel_credentials(self.tls_root) if self.tls_root else None
        return health_probe.status(self.address, service, timeout_s=2.0, credentials=credentials)

    def metrics(self) -> Samples:
        """Its /metrics, every sample."""
        return read_metrics(f"http://{LOOPBACK}:{self.metrics_port}/metrics")

    def metric(self, name: str, **labels: str) -> float | None:
        """One sample of its /metrics (`omnigen2_warmups_total`, outcome="ok"); None when absent."""
        return sample(self.metrics(), name, **labels)

    def start(self, timeout: float = 60.0) -> FrontendProcess:
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"front end exited with {self.process.returncode}:\n{self.log_path.read_text()}")
            try:
                self.health()
                if self.http_port:  # it listens right after the gRPC server has started
                    socket.create_connection((LOOPBACK, self.http_port), timeout=2.0).close()
                return self
            except (grpc.RpcError, OSError):
                time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"front end not answering after {timeout:.0f} s:\n{self.log_path.read_text()}")

    def wait_health(self, status: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.health() != status:
            if time.monotonic() > deadline:
                raise TimeoutError(f"health never became {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> FrontendProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

"""What the soak reads from the stack under test: its /metrics, its access log, its processes' memory, and the
calls it makes to it before and after the storm (probe references, admission at full width)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import grpc
import numpy as np
import psutil
from omnigen2.v1 import omnigen2_pb2 as pb
from omnigen2.v1 import omnigen2_pb2_grpc as pbg

from benchmarks.soak.invariants import IDLE_GAUGES
from benchmarks.soak.mix import probes
from benchmarks.soak.worker import max_diff, pixels
from serving.frontend.metrics_page import Samples, read_metrics


def wait_idle(url: str, timeout_s: float) -> tuple[Samples, float]:
    """The /metrics once every idle gauge reads 0, or as last read after `timeout_s`; and the seconds waited."""
    started = time.monotonic()
    while True:
        samples = read_metrics(url, timeout_s=10)
        idle = all(value == 0 for (name, _), value in samples.items() if name in IDLE_GAUGES)
        waited = time.monotonic() - started
        if idle or waited > timeout_s:
            return samples, waited
        time.sleep(0.5)


class AccessLog:
    """The lines a log file gains from now on (the stack may have logged for hours before)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size

    def new_lines(self) -> list[str]:
        with self.path.open("rb") as log:
            log.seek(self.offset)
            return log.read().decode(errors="replace").splitlines()


def _listener(port: int) -> psutil.Process | None:
    for connection in psutil.net_connections(kind="tcp"):
        if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port and connection.pid:
            return psutil.Process(connection.pid)
    return None


def _role(process: psutil.Process) -> str:
    command = process.cmdline()
    if process.name() == "tritonserver":
        return "tritonserver"
    model = next((part.split("/")[-3] for part in command if part.endswith("/1/model.py")), None)
    return f"stub {model}" if model else process.name()


def stack_rss(grpc_address: str) -> dict[str, float]:
    """RSS in MiB of the front end (the process listening on the gRPC address), tritonserver (its child under
    `make serve`, else the listener of its --triton-url) and tritonserver's stub processes; keyed by role and pid."""
    front = _listener(int(grpc_address.rsplit(":", 1)[1]))
    if front is None:
        return {}
    found = [front]
    triton = next((p for p in front.children(recursive=True) if p.name() == "tritonserver"), None)
    if triton is None:
        url = next((a.split("=", 1)[1] for a in front.cmdline() if a.startswith("--triton-url=")), None)
        triton = _listener(int(url.rsplit(":", 1)[1])) if url else None
    if triton is not None:
        found += [triton, *triton.children(recursive=True)]
    rss = {}
    for process in dict.fromkeys(found):
        try:
            name = "front end" if process == front else _role(process)
            rss[f"{name} ({process.pid})"] = round(process.memory_info().rss / 2**20, 1)
        except psutil.NoSuchProcess:
            continue
    return rss


async def _probe_pixels(address: str) -> dict[str, list[np.ndarray]]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pbg.OmniGen2Stub(channel)
        return {name: pixels(await stub.Generate(r, timeout=300)) for name, r in probes().items()}


def probe_references(address: str, out: Path) -> None:
    """Each probe run alone, one after another: the pixels the storm's probes are held to (.npz, for the workers)."""
    refs = asyncio.run(_probe_pixels(address))
    arrays = {f"{name}/{i}": image for name, images in refs.items() for i, image in enumerate(images)}
    np.savez(out, **arrays, **{f"{name}/n": np.array(len(images)) for name, images in refs.items()})


def probes_after(address: str, refs: Path) -> dict[str, int]:
    got = asyncio.run(_probe_pixels(address))
    with np.load(refs) as saved:
        return {
            name: max_diff(images, [saved[f"{name}/{i}"] for i in range(int(saved[f"{name}/n"]))])
            for name, images in got.items()
        }


async def _full_width(address: str, http: str, width: int) -> tuple[list[str], list[int]]:
    # Long enough (20 steps) that the calls overlap: a slot or budget a storm left held refuses one of them.
    request = pb.GenerateRequest(prompt="a cat", width=64, height=64, steps=20, seed=3)
    body = {"prompt": "a cat", "size": "64x64", "num_inference_steps": 20}
    async with grpc.aio.insecure_channel(address) as channel, aiohttp.ClientSession() as session:
        stub = pbg.OmniGen2Stub(channel)

        async def one_grpc() -> str:
            try:
                await stub.Generate(request, timeout=120)
                return "OK"
            except grpc.aio.AioRpcError as error:
                return str(error.code().name)

        async def one_http() -> int:
            async with session.post(f"{http}/v1/images/generations", json=body) as response:
                await response.read()
                return response.status

        outcomes = await asyncio.gather(*(one_grpc() for _ in range(width)))
        statuses = await asyncio.gather(*(one_http() for _ in range(width)))
    return list(outcomes), list(statuses)


def admission_at_full_width(address: str, http: str, width: int) -> tuple[list[str], list[int]]:
    return asyncio.run(_full_width(address, http, width))

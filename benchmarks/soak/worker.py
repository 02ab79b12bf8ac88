"""One storm worker process: `tasks` loops of random calls for `seconds`, each call written to a JSONL file as it
starts and as it ends. A process of its own so that the storm can SIGKILL it: every connection it holds then drops
at once, as when a client machine dies (calls with a start record and no end record)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import random
import socket
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import grpc
import numpy as np
from omnigen2.v1 import omnigen2_pb2 as pb
from omnigen2.v1 import omnigen2_pb2_grpc as pbg
from PIL import Image

from benchmarks.soak.mix import Fault, Mix, is_http, probes


@dataclass
class WorkerConfig:
    name: str
    seed: str
    tasks: int
    seconds: float
    grpc: str  # host:port
    http: str  # http://host:port
    out: str  # the JSONL file
    refs: str  # the probes' reference pixels (.npz), taken alone before the storm


def pixels(reply: pb.GenerateResponse) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(image.data)).convert("RGB")).astype(np.int16) for image in reply.images]


def max_diff(got: list[np.ndarray], want: list[np.ndarray]) -> int:
    """Largest difference in levels of 255 over every pixel and image; a missing or reshaped image counts 255."""
    if len(got) != len(want) or any(a.shape != b.shape for a, b in zip(got, want, strict=True)):
        return 255
    return max(int(np.abs(a - b).max()) for a, b in zip(got, want, strict=True))


async def _headers_sent(session: aiohttp.ClientSession, context: types.SimpleNamespace, params: object) -> None:
    context.trace_request_ctx.headers = True


class Worker:
    def __init__(self, config: WorkerConfig, log: TextIO) -> None:
        self.config = config
        self.log = log
        self.count = 0
        self.probes = probes()
        with np.load(config.refs) as refs:
            self.refs = {name: [refs[f"{name}/{i}"] for i in range(int(refs[f"{name}/n"]))] for name in self.probes}

    def record(self, **fields: Any) -> None:
        self.log.write(json.dumps({"t": time.time(), **fields}) + "\n")
        self.log.flush()  # a SIGKILL must not lose the start records of the calls it cuts

    def start(self, kind: str, fault: Fault, **extra: Any) -> str:
        self.count += 1
        call_id = f"{self.config.name}-{self.count}-{kind}"
        self.record(id=call_id, worker=self.config.name, kind=kind, event="start", fault=fault.describe(), **extra)
        return call_id

    async def grpc_call(self, stub: pbg.OmniGen2Stub, mix: Mix, kind: str) -> None:
        fault = mix.fault(streamed=kind != "generate")
        call_id = self.start(kind, fault)
        metadata = (("x-request-id", call_id),)
        call: Any
        if kind == "generate":
            call = stub.Generate(mix.generate(), metadata=metadata, timeout=fault.deadline_s)
        elif kind == "stream":
            request = mix.generate()
            request.previews = mix.rng.random() < 0.7
            call = stub.GenerateStream(request, metadata=metadata, timeout=fault.deadline_s)
        else:
            call = stub.Understand(mix.understand(), metadata=metadata, timeout=fault.deadline_s)
        cancelled = False

        async def consume() -> None:
            nonlocal cancelled
            if kind == "generate":
                await call
                return
            events = 0
            async for _ in call:
                events += 1
                if events == fault.stop_after_events:
                    cancelled = call.cancel()
                    return

        task = asyncio.ensure_future(consume())
        if fault.cancel_after_s is not None:
            done, _ = await asyncio.wait({task}, timeout=fault.cancel_after_s)
            if not done:
                cancelled = call.cancel()
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
            await task  # its status is read below
        seen = (await call.code()).name
        by_client = cancelled or (fault.deadline_s is not None and seen == "DEADLINE_EXCEEDED")
        self.record(id=call_id, event="end", seen=seen, by_client=by_client)

    async def probe(self, stub: pbg.OmniGen2Stub, mix: Mix) -> None:
        name = mix.rng.choice(sorted(self.probes))
        call_id = self.start("probe", Fault(), probe=name)
        try:
            reply = await stub.Generate(self.probes[name], metadata=(("x-request-id", call_id),), timeout=300)
        except grpc.aio.AioRpcError as error:
            self.record(id=call_id, event="end", seen=error.code().name, by_client=False)
            return
        diff = max_diff(pixels(reply), self.refs[name])
        self.record(id=call_id, event="end", seen="OK", by_client=False, probe=name, max_diff=diff)

    async def http_call(self, session: aiohttp.ClientSession, mix: Mix, kind: str) -> None:
        stream = mix.rng.random() < 0.5
        roll = mix.rng.random()
        fault = Fault(cancel_after_s=mix.rng.choice([0.0, 0.05, 0.3, 1.0, 3.0])) if roll < 0.6 else Fault()
        call_id = self.start(kind, fault, stream=stream)
        base, headers = self.config.http, {"x-request-id": call_id}
        body: dict[str, Any]
        if kind == "http-image":
            url, body = f"{base}/v1/images/generations", {"json": mix.http_image(stream)}
        elif kind == "http-edit":
            form = aiohttp.FormData()
            for key, value in mix.http_edit(stream):
                if isinstance(value, bytes):
                    form.add_field(key, value, filename="x.png", content_type="image/png")
                else:
                    form.add_field(key, value)
            url, body = f"{base}/v1/images/edits", {"data": form}
        else:
            url, body = f"{base}/v1/chat/completions", {"json": mix.http_chat(stream)}

        sent = types.SimpleNamespace(headers=False)  # set by _headers_sent: whether the server can know of the call

        async def read_all() -> int:
            async with session.post(url, headers=headers, trace_request_ctx=sent, **body) as response:
                async for _ in response.content.iter_any():
                    pass
                return response.status

        task = asyncio.ensure_future(read_all())
        seen: str | None = None
        if fault.cancel_after_s is not None:
            done, _ = await asyncio.wait({task}, timeout=fault.cancel_after_s)
            if not done:
                task.cancel()
                seen = "client-abort"
        try:
            status = await task
            seen = seen or str(status)
        except asyncio.CancelledError:
            seen = seen or "client-abort"
        except (aiohttp.ClientError, OSError) as error:
            seen = seen or type(error).__name__  # the server closed on us: no status to compare
        self.record(id=call_id, event="end", seen=seen, by_client=seen == "client-abort", sent=sent.headers)

    def http_reset(self, mix: Mix) -> None:
        """A raw streamed request (sometimes half its body) on a socket closed with a TCP reset (SO_LINGER 0)."""
        call_id = self.start("http-reset", Fault())
        steps = mix.rng.randint(2, 20)
        body = json.dumps(
            {"prompt": "a cat", "size": "64x64", "num_inference_steps": steps, "stream": True, "partial_images": 2}
        ).encode()
        head = (
            "POST /v1/images/generations HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            f"x-request-id: {call_id}\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        sent = body[: len(body) // 2] if mix.rng.random() < 0.2 else body
        host, port = self.config.http.removeprefix("http://").rsplit(":", 1)
        with socket.create_connection((host, int(port))) as connection:
            connection.sendall(head + sent)
            time.sleep(mix.rng.choice([0.0, 0.05, 0.2, 0.8]))
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        self.record(id=call_id, event="end", seen="reset", by_client=True)

    async def loop(self, task: int, stub: pbg.OmniGen2Stub, session: aiohttp.ClientSession, until: float) -> None:
        mix = Mix(random.Random(f"{self.config.seed}/{task}"))
        while time.monotonic() < until:
            kind = mix.kind()
            try:
                if kind == "probe":
                    await self.probe(stub, mix)
                elif kind == "http-reset":
                    await asyncio.to_thread(self.http_reset, mix)
                elif is_http(kind):
                    await self.http_call(session, mix, kind)
                else:
                    await self.grpc_call(stub, mix, kind)
            except Exception as error:  # a worker fault, not a call outcome: reported, never a crash of the storm
                self.record(event="worker-error", kind=kind, error=repr(error))
            if mix.rng.random() < 0.3:
                await asyncio.sleep(mix.rng.random() * 0.3)

    async def run(self) -> None:
        until = time.monotonic() + self.config.seconds
        trace = aiohttp.TraceConfig()
        trace.on_request_headers_sent.append(_headers_sent)
        session = aiohttp.ClientSession(trace_configs=[trace])
        async with grpc.aio.insecure_channel(self.config.grpc) as channel, session:
            stub = pbg.OmniGen2Stub(channel)
            await asyncio.gather(*(self.loop(task, stub, session, until) for task in range(self.config.tasks)))


def main(argv: list[str]) -> None:
    config = WorkerConfig(**json.loads(argv[0]))
    with Path(config.out).open("a") as log:
        asyncio.run(Worker(config, log).run())


if __name__ == "__main__":
    main(sys.argv[1:])

"""What gRPC still holds for a GenerateStream cut off because its caller does not read: the message whose write was
in progress, not the ones written before it (serving/frontend/service.py charges that one message's pixels and
bytes until gRPC lets go of the call).

A write returns once gRPC has handed the message to its socket, so the messages before the cut are in the kernel's
socket buffers, not in the process. Measured here: callers over raw HTTP/2 that grant a window of 2 GiB and never
read their sockets, so that gRPC writes previews until the kernel's buffers are full (a few MiB a connection) and
the next write stalls. The front end's RSS (after malloc_trim) drops, when the callers close, by about twice the
cut messages' bytes (gRPC's copy and the pending send's), far from the bytes of the earlier, written messages.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import os
from collections.abc import AsyncIterator

import numpy as np
from omnigen2.v1 import omnigen2_pb2 as pb

from benchmarks.proc_memory import proc_status_kib
from serving.frontend.admission import Load
from serving.frontend.config import MiB
from serving.frontend.triton_backend import Event, ProgressEvent, ResultEvent
from tests.frontends import in_process_frontend, until
from tests.test_unary_reply import STALLED, SilentCaller

GENERATE_STREAM = "/omnigen2.v1.OmniGen2/GenerateStream"
SIDE = 512  # a preview of noise: about 0.77 MiB of PNG
CALLS = 3
STEPS = 60  # more previews than the kernel's buffers take
pulled: list[int] = []  # one entry per preview the stand-in backend was asked for


async def _previews(*args: object, **kwargs: object) -> AsyncIterator[Event]:
    rng = np.random.default_rng(1)
    for step in range(STEPS):
        pulled.append(step)
        yield ProgressEvent(step + 1, STEPS, rng.integers(0, 256, (1, SIDE, SIDE, 3), dtype=np.uint8))
    yield ResultEvent(1, {}, rng.integers(0, 256, (1, SIDE, SIDE, 3), dtype=np.uint8), np.zeros(1), 0, 0, [])


def _rss_mib() -> float:
    """The process's resident memory once Python's cycles are collected and glibc has given back what it can."""
    gc.collect()  # a cycle holding a preview would otherwise be counted in one read and not the other
    ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    return proc_status_kib(os.getpid(), "VmRSS") / 1024


def test_a_cut_stream_leaves_only_its_last_message_with_grpc() -> None:
    async def run() -> None:
        pulled.clear()
        async with in_process_frontend(
            stream_write_timeout_s=1.0,
            stream_min_write_rate=256 * MiB,  # a preview's own time is nothing
            max_inflight_output_pixels=1 << 40,
        ) as (frontend, _):
            frontend.backend.generate = _previews  # type: ignore[method-assign,assignment]
            counted = frontend.metrics.registry.get_sample_value
            admission = frontend.service.admission
            request = pb.GenerateRequest(prompt="noise", width=SIDE, height=SIDE, steps=STEPS, previews=True)
            window = (1 << 31) - 1
            callers = [
                await asyncio.to_thread(
                    SilentCaller, frontend.port, GENERATE_STREAM, request.SerializeToString(), False, window
                )
                for _ in range(CALLS)
            ]

            def cuts() -> float:  # stalled, or on a loaded box "slow" (the loop's delays on earlier writes)
                labels = (STALLED, {**STALLED, "reason": "slow"})
                return sum(counted("omnigen2_cut_off_transfers_total", cut) or 0 for cut in labels)

            try:
                await until(lambda: cuts() == CALLS, "the cuts")
                await until(lambda: admission.calls == 0, "the places to come back")
                # Each call keeps one preview's pixels, the one whose write was cut, and its bytes.
                assert admission.held == Load(output_pixels=CALLS * SIDE * SIDE)
                cut_mib = (counted("omnigen2_cut_reply_bytes") or 0) / MiB
                assert CALLS * 0.5 < cut_mib < CALLS * 1.0  # PNG of noise: 0.75 MiB a preview
                written_mib = (len(pulled) - CALLS) * cut_mib / CALLS  # each call's last preview is the cut one
                assert written_mib > CALLS * 1.0, "the kernel took too little to tell anything apart"
                held = _rss_mib()
            finally:
                for caller in callers:
                    caller.close()
            await until(lambda: admission.held == Load(), "the cut previews' pixels to come back")
            assert counted("omnigen2_cut_reply_bytes") == 0
            await asyncio.sleep(0.5)  # gRPC frees the closed connections' calls
            let_go = held - _rss_mib()
            # About 2 x cut_mib (measured 2.0x). Had gRPC kept the written previews, it would let go of those too.
            assert cut_mib / 2 < let_go < 2 * cut_mib + written_mib / 2, (let_go, cut_mib, written_mib)

    asyncio.run(run())

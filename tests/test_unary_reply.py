"""A unary Generate's reply to a caller that does not take it: the call keeps its place and budgets until gRPC has
sent the reply, and is cut off after --stream-write-timeout-s (serving/frontend/service.py, reading.py); the reply,
queued in gRPC until its caller takes it or its connection closes, keeps its output pixels held until then.

A front end in process whose backend returns a large result at once, and a caller speaking raw HTTP/2: it sends its
request and never grants the server more than the 64 KiB flow-control window every HTTP/2 stream starts with (a gRPC
client's transport takes a unary reply whatever its application does, so it cannot play this caller).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import threading
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2, status_pb2
from omnigen2.v1 import omnigen2_pb2 as pb
from omnigen2.v1 import omnigen2_pb2_grpc as pb_grpc

from serving.frontend.admission import Load
from serving.frontend.config import FrontendConfig, MiB
from serving.frontend.server import Frontend
from serving.frontend.triton_backend import Event, ResultEvent
from serving.triton.ports import free_port
from tests.frontends import until

GENERATE = "/omnigen2.v1.OmniGen2/Generate"
SIDE = 1024  # one image of noise: about 3 MiB of PNG, 48 times the caller's window
DATA, HEADERS, SETTINGS, PING, WINDOW_UPDATE = 0, 1, 4, 6, 8
END_STREAM, END_HEADERS, ACK = 1, 4, 1
INITIAL_WINDOW_SIZE = 4  # the SETTINGS parameter
STALLED = {"api": "grpc", "transfer": "answer", "reason": "stalled"}  # omnigen2_cut_off_transfers_total's labels


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def _header(name: str, value: str) -> bytes:
    """HPACK: a literal field, not indexed, neither string Huffman-coded (each under 127 bytes)."""
    return b"\x00" + bytes([len(name)]) + name.encode() + bytes([len(value)]) + value.encode()


class SilentCaller:
    """One call over raw HTTP/2 that takes no more of its reply than the initial window. With `window`, it grants
    that much (stream and connection) at once and never reads its socket: the server writes into the kernel's
    buffers until they are full."""

    def __init__(
        self, port: int, method: str, message: bytes, answers_pings: bool = False, window: int | None = None
    ) -> None:
        self.answers_pings = answers_pings  # as a gRPC client's transport does, whatever its application does
        self.socket = socket.create_connection(("127.0.0.1", port), timeout=30)
        fields = {
            ":method": "POST",
            ":scheme": "http",
            ":path": method,
            ":authority": f"127.0.0.1:{port}",
            "content-type": "application/grpc",
            "te": "trailers",
        }
        headers = b"".join(_header(name, value) for name, value in fields.items())
        framed = b"\x00" + struct.pack(">I", len(message)) + message  # gRPC: uncompressed, length, message
        settings, grant = b"", b""
        if window is not None:  # SETTINGS_INITIAL_WINDOW_SIZE, and the connection's window raised to match
            settings = struct.pack(">HI", INITIAL_WINDOW_SIZE, window)
            grant = _frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", window - 65535))
        self.socket.sendall(
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
            + _frame(SETTINGS, 0, 0, settings)
            + grant
            + _frame(HEADERS, END_HEADERS, 1, headers)
            + _frame(DATA, END_STREAM, 1, framed)
        )
        self.frames: list[tuple[int, int, bytes]] = []  # (type, flags, payload) of stream 1
        self.data_bytes = 0
        self._buffer = b""
        self.replying = threading.Event()  # the reply's first bytes have come
        self.ended = threading.Event()  # the stream's last frame has come
        self.gone = threading.Event()  # reading stopped: the stream ended, or the connection closed
        self._reader = threading.Thread(target=self._read, daemon=True)
        if window is None:
            self._reader.start()

    def _read(self) -> None:
        try:
            self._read_frames()
        finally:
            self.gone.set()

    def _read_frames(self) -> None:
        while not self.ended.is_set():
            try:
                chunk = self.socket.recv(1 << 20)
            except OSError:
                return
            if not chunk:
                return
            self._buffer += chunk
            while len(self._buffer) >= 9 and len(self._buffer) >= 9 + int.from_bytes(self._buffer[:3], "big"):
                length = int.from_bytes(self._buffer[:3], "big")
                kind, flags, stream = self._buffer[3], self._buffer[4], int.from_bytes(self._buffer[5:9], "big")
                payload, self._buffer = self._buffer[9 : 9 + length], self._buffer[9 + length :]
                if kind == SETTINGS and not flags & ACK:
                    self.socket.sendall(_frame(SETTINGS, ACK, 0))
                if kind == PING and not flags & ACK and self.answers_pings:
                    self.socket.sendall(_frame(PING, ACK, 0, payload))
                if stream != 1:
                    continue
                self.frames.append((kind, flags, payload))
                if kind == DATA:
                    self.data_bytes += length
                    self.replying.set()
                if flags & END_STREAM:
                    self.ended.set()

    def take_the_rest(self) -> None:
        """Grants the connection and the stream a window for everything (the caller comes back)."""
        grant = struct.pack(">I", 1 << 30)
        self.socket.sendall(_frame(WINDOW_UPDATE, 0, 0, grant) + _frame(WINDOW_UPDATE, 0, 1, grant))

    def close(self) -> None:
        with contextlib.suppress(OSError):  # the server may have closed the connection already
            self.socket.shutdown(socket.SHUT_RDWR)  # wakes the reader up
        self.socket.close()
        if self._reader.is_alive():
            self._reader.join()


async def _result(*args: object, **kwargs: object) -> AsyncIterator[Event]:
    """The backend's result at once: one image of noise (it does not compress)."""
    images = np.random.default_rng(1).integers(0, 256, (1, SIDE, SIDE, 3), dtype=np.uint8)
    yield ResultEvent(1, {}, images, np.zeros(1, np.float32), 0, 0, [])


def _retry_after_s(error: grpc.aio.AioRpcError) -> float:
    packed = status_pb2.Status.FromString(dict(error.trailing_metadata())["grpc-status-details-bin"])
    retry = error_details_pb2.RetryInfo()
    assert packed.details[0].Unpack(retry)
    return retry.retry_delay.ToNanoseconds() / 1e9


@pytest.mark.parametrize("let_go", ["taken", "closed"])
def test_a_unary_reply_nobody_takes_holds_its_place_until_it_is_cut_off(
    let_go: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Before, Generate gave its place and budgets back as it handed its reply to gRPC: the reply then waited on
    its caller outside every budget, and a second call was admitted at --max-in-flight 1 while it waited. After the
    cut, the reply stays in gRPC until its caller takes it (`taken`) or its connection closes (`closed`): its output
    pixels stay held until then (before, nothing was: callers could leave a reply each every write timeout)."""
    timeout_s = 3.0

    async def run() -> None:
        unused = f"127.0.0.1:{free_port()}"
        config = FrontendConfig(
            listen="127.0.0.1:0",
            triton_url=unused,
            metrics_port=0,
            shutdown_grace_s=1.0,
            max_in_flight=1,
            max_inflight_output_pixels=SIDE * SIDE,  # the reply's: a second such call does not fit beside it
            stream_write_timeout_s=timeout_s,
            stream_min_write_rate=64 * MiB,  # the reply's own time is a fraction of a second
        )
        frontend = Frontend(config)
        frontend.backend.generate = _result  # type: ignore[method-assign,assignment]
        port = await frontend.start()
        counted = frontend.metrics.registry.get_sample_value
        admission = frontend.service.admission
        request = pb.GenerateRequest(prompt="noise", width=SIDE, height=SIDE, steps=1, seed=1)
        caller = await asyncio.to_thread(SilentCaller, port, GENERATE, request.SerializeToString())
        try:
            await until(caller.replying.is_set, "the reply's first bytes")

            def cut() -> float:
                return counted("omnigen2_cut_off_transfers_total", STALLED) or 0

            # Its place and output pixels are held while the reply waits (unless a loaded box let it be cut first).
            assert cut() == 1 or (admission.calls == 1 and admission.held.output_pixels == SIDE * SIDE)
            assert caller.data_bytes <= 65535 and not caller.ended.is_set()
            options = [("grpc.max_receive_message_length", 64 * MiB)]
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
                stub = pb_grpc.OmniGen2Stub(channel)
                try:
                    await stub.Generate(request, timeout=30)
                except grpc.aio.AioRpcError as refused:
                    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                else:
                    assert cut() == 1, "a second call was admitted beside the unsent reply"
                await until(lambda: cut() == 1, "the unread reply to be cut off")
                await until(lambda: admission.calls == 0, "the place to come back")
                cancelled = {"method": "Generate", "code": "CANCELLED"}
                await until(lambda: counted("omnigen2_requests_total", cancelled) == 1, "the call to be recorded")
                # The reply is still queued in gRPC: its bytes and output pixels stay charged, and a call that
                # would not fit beside it is refused with RetryInfo.
                assert (counted("omnigen2_cut_reply_bytes") or 0) > SIDE * SIDE * 3  # noise: no smaller
                assert admission.held == Load(output_pixels=SIDE * SIDE)
                with pytest.raises(grpc.aio.AioRpcError) as busy:
                    await stub.Generate(request, timeout=30)
                assert busy.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "output pixels in flight" in (busy.value.details() or "")
                assert _retry_after_s(busy.value) == config.retry_after_s
                if let_go == "taken":
                    # The caller that comes back for its reply finds the call ended, CANCELLED, naming the timeout.
                    caller.take_the_rest()
                    await until(caller.ended.is_set, "the cut-off call's status")
                    kind, _, trailers = caller.frames[-1]
                    assert kind == HEADERS and b"grpc-status" in trailers and b"read nothing" in trailers
                    assert trailers.split(b"grpc-status", 1)[1][:2] == b"\x011"  # CANCELLED, as a literal value
                else:
                    caller.close()
                await until(lambda: admission.held == Load(), "the reply's output pixels to come back")
                assert counted("omnigen2_cut_reply_bytes") == 0
                # An ordinary unary caller gets its reply whole.
                served = await stub.Generate(request, timeout=30)
                assert len(served.images) == 1 and len(served.images[0].data) > SIDE * SIDE * 3
        finally:
            caller.close()
            await frontend.stop()

    with caplog.at_level(logging.INFO):
        asyncio.run(run())
    assert [r for r in caplog.records if "Generate " in r.getMessage() and "status=CANCELLED" in r.getMessage()]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # grpcio's "Abort error ... suppressed"

"""HTTP callers that stall, sending headers or a body that never end or reading nothing of their answer, are cut
off in bounded time: a stalled body or answer held one of the gateway's `--max-in-flight` places for as long as its
connection stayed open, so a few such connections refused every other POST with 429; stalled headers held a file
descriptor for an hour. Connections past --http-max-connections are refused at once, so that they cannot run the
process out of files."""

from __future__ import annotations

import http.client
import json
import selectors
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from serving.frontend.process import FrontendProcess
from serving.triton.launcher import TritonServer
from serving.triton.ports import LOOPBACK

ROUTE = "/v1/images/generations"
MiB = 1024 * 1024
MIN_BODY_RATE = 64 * 1024  # --http-min-body-rate, its default


@pytest.fixture(scope="module")
def frontend(tmp_path_factory: pytest.TempPathFactory, triton: TritonServer) -> Iterator[FrontendProcess]:
    log = tmp_path_factory.mktemp("http-stalls") / "frontend.log"
    timeouts = ("--http-body-timeout-s=2", "--stream-write-timeout-s=2", "--http-idle-timeout-s=2")
    flags = ("--max-in-flight=2", *timeouts, f"--http-min-body-rate={MIN_BODY_RATE}", "--no-warmup")
    with FrontendProcess(triton.grpc_url, log, *flags, http=True) as started:
        yield started


def _post(frontend: FrontendProcess, body: object) -> int:
    connection = http.client.HTTPConnection(LOOPBACK, frontend.http_port, timeout=60)
    try:
        connection.request("POST", ROUTE, json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def _unread(frontend: FrontendProcess, body: bytes, length: int | None = None) -> socket.socket:
    """A connection that sends a POST (its body up to `length` bytes, the whole of it by default) and reads nothing
    after it, with a tiny receive window: the answer backs up on the server."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((LOOPBACK, frontend.http_port))
    head = f"POST {ROUTE} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
    sock.sendall(f"{head}Content-Length: {len(body) if length is None else length}\r\n\r\n".encode() + body)
    return sock


def _count(frontend: FrontendProcess, status: int) -> float:
    """POSTs to ROUTE answered (or cut off) with `status`."""
    found = frontend.metric("omnigen2_http_requests_total", method="POST", route=ROUTE, status=str(status))
    return found or 0.0


def _until_served(frontend: FrontendProcess, timeout_s: float) -> float:
    start = time.monotonic()
    while _post(frontend, {"prompt": "x", "size": "16x16", "steps": 1}) == 429:
        assert time.monotonic() - start < timeout_s, "the stalled callers still hold the gateway's places"
        time.sleep(0.5)
    return time.monotonic() - start


def test_a_body_that_never_ends_is_refused_and_gives_its_place_back(frontend: FrontendProcess) -> None:
    holders = [_unread(frontend, b"", length=100) for _ in range(2)]  # none of the 100 bytes sent
    try:
        for holder in holders:
            holder.settimeout(20)
            assert holder.recv(64).startswith(b"HTTP/1.1 408")  # 2 s in; before: never answered
        _until_served(frontend, 5)
    finally:
        for holder in holders:
            holder.close()


def test_answers_nobody_reads_are_cut_off_and_give_their_places_back(frontend: FrontendProcess) -> None:
    """About 7 MB of noisy PNGs as base64, unstreamed and streamed: more than loopback's socket buffers hold."""
    before = _count(frontend, 408)
    request = {"prompt": "noise", "size": "512x512", "steps": 1, "n": 8}
    readers = [_unread(frontend, json.dumps({**request, "stream": stream}).encode()) for stream in (False, True)]
    try:
        deadline = time.monotonic() + 10
        while _post(frontend, {"prompt": "x", "size": "16x16", "steps": 1}) != 429:  # the two hold both places
            assert time.monotonic() < deadline
        deadline = time.monotonic() + 120
        while _count(frontend, 408) - before < 2:  # before: neither ever ended while its connection stayed open
            assert time.monotonic() < deadline, "the stalled callers still hold the gateway's places"
            time.sleep(0.5)
        assert _post(frontend, {"prompt": "x", "size": "16x16", "steps": 1}) == 200
    finally:
        for reader in readers:
            reader.close()


def _read_slowly(sock: socket.socket, rate: int) -> tuple[http.client.HTTPResponse, bytes]:
    """The answer on `sock`, its body taken at about `rate` bytes a second, 64 KiB at a time: slowly but steadily."""
    response = http.client.HTTPResponse(sock)
    response.begin()
    body = b""
    while piece := response.read(64 * 1024):
        body += piece
        time.sleep(len(piece) / rate)
    return response, body


def test_an_answer_read_slowly_but_steadily_is_sent_whole(frontend: FrontendProcess) -> None:
    """The write timeout is for callers that take nothing: one taking the 7 MB answer at 1.5 MiB/s (4.5 s, over twice
    the timeout) gets all of it, while one beside it that reads nothing is still cut off. Before, the whole write had
    to end within the timeout: the slow reader was cut off 2 s into it."""
    before = _count(frontend, 408)
    request = json.dumps({"prompt": "noise", "size": "512x512", "steps": 1, "n": 8}).encode()
    unread, slow = _unread(frontend, request), _unread(frontend, request)
    try:
        response, body = _read_slowly(slow, 3 << 19)
        # Kept open until it is cut off: the two generations take turns on the CPU, so the unread one's answer may
        # only begin once the slow reader is done, and closing it then would be a disconnect (499), not a stall.
        deadline = time.monotonic() + 60
        while _count(frontend, 408) - before < 1:
            assert time.monotonic() < deadline, "the caller that read nothing was not cut off"
            time.sleep(0.2)
    finally:
        unread.close()
        slow.close()
    assert response.status == 200 and len(body) == int(response.headers["Content-Length"]) > 5_000_000
    assert len(json.loads(body)["data"]) == 8
    assert _count(frontend, 408) - before == 1


def test_a_body_sent_slowly_but_steadily_is_taken(frontend: FrontendProcess) -> None:
    """512 KiB at 160 KiB/s (above MIN_BODY_RATE), 3.2 s without a gap: past the 2 s the timeout used to give any
    body (before: 408)."""
    request = json.dumps({"prompt": "x", "size": "16x16", "steps": 1}).encode().ljust(512 * 1024)  # trailing spaces
    assert 2 * MIN_BODY_RATE < 16 * 1024 / 0.1

    def paced() -> Iterator[bytes]:
        for start in range(0, len(request), 16 * 1024):
            time.sleep(0.1)
            yield request[start : start + 16 * 1024]

    connection = http.client.HTTPConnection(LOOPBACK, frontend.http_port, timeout=60)
    try:
        headers = {"Content-Type": "application/json", "Content-Length": str(len(request))}
        connection.request("POST", ROUTE, paced(), headers)
        response = connection.getresponse()
        response.read()
        assert response.status == 200
    finally:
        connection.close()


def test_a_body_that_stops_midway_is_refused_after_the_timeout(frontend: FrontendProcess) -> None:
    """64 KiB of a 1 MiB body, then nothing: 408 within seconds."""
    start = time.monotonic()
    holder = _unread(frontend, b" " * 65536, length=1 << 20)
    try:
        holder.settimeout(20)
        assert holder.recv(64).startswith(b"HTTP/1.1 408")
        assert time.monotonic() - start < 8
    finally:
        holder.close()


def test_a_body_trickled_below_the_slowest_rate_is_refused(frontend: FrontendProcess) -> None:
    """1 KiB every 0.5 s, never a gap of 2 s, of an 8 MiB body: 408 once, past the 2 s grace, it is behind
    MIN_BODY_RATE; not after the 128 s its size would take at that rate (before), nor never (a gap-only bound)."""
    start = time.monotonic()
    trickle = _unread(frontend, b"", length=8 * MiB)
    trickle.settimeout(0.5)
    try:
        while True:
            assert time.monotonic() - start < 20, "the trickled body was never refused"
            trickle.sendall(b" " * 1024)
            try:
                answer = trickle.recv(64)
                break
            except TimeoutError:
                continue
        assert answer.startswith(b"HTTP/1.1 408") and time.monotonic() - start < 8
    finally:
        trickle.close()


def test_a_connection_whose_headers_never_end_is_closed(frontend: FrontendProcess) -> None:
    """Each such connection held a file descriptor for aiohttp's default hour: about 20 000 of them (the process's
    limit) took the front end down, gRPC included (health DEADLINE_EXCEEDED, accept() failing in a loop)."""
    quiet = socket.create_connection((LOOPBACK, frontend.http_port))
    try:
        quiet.sendall(f"POST {ROUTE} HTTP/1.1\r\nHost: localhost\r\n".encode())
        quiet.settimeout(20)
        assert quiet.recv(64) == b""  # closed 2 s in
    finally:
        quiet.close()


def test_a_caller_that_leaves_mid_stream_is_499_not_a_server_error(frontend: FrontendProcess) -> None:
    """A write that finds the connection closing (the caller gone, and aiohttp not yet told) raised out of the
    handler: a traceback in the log and a 500 in the metrics, for 6 of 30 and 1 of 20 streams in the runs tried (a
    race, hence 40)."""
    body = json.dumps({"prompt": "x", "size": "64x64", "steps": 4, "stream": True, "partial_images": 2}).encode()
    before = _count(frontend, 200) + _count(frontend, 499)
    for _ in range(40):
        connection = http.client.HTTPConnection(LOOPBACK, frontend.http_port, timeout=60)
        connection.request("POST", ROUTE, body, {"Content-Type": "application/json"})
        assert connection.getresponse().status == 200
        connection.close()
    deadline = time.monotonic() + 10
    while _count(frontend, 200) + _count(frontend, 499) - before < 40:  # each either finished or was cut short
        assert time.monotonic() < deadline, "a stream whose caller left counted as neither 200 nor 499"
        time.sleep(0.2)
    assert _count(frontend, 200) + _count(frontend, 499) - before == 40
    assert _count(frontend, 500) == 0
    assert "failed (request_id=" not in frontend.log_path.read_text()


def test_connections_past_the_bound_are_refused_and_both_apis_keep_serving(
    tmp_path: Path, triton: TritonServer
) -> None:
    """A front end allowed 512 files, so at most 256 HTTP connections by default: of 600 held open, the rest are
    answered 503 and closed at once, while the held ones and the gRPC API are served. Before: none refused, and
    the process out of files (its log: accept() failing with "Too many open files" 1404 times in a second)."""
    frontend = FrontendProcess(triton.grpc_url, tmp_path / "frontend.log", "--no-warmup", http=True)
    frontend.command[:0] = ["prlimit", "--nofile=512:512"]
    with frontend, selectors.DefaultSelector() as selector:
        held: list[socket.socket] = []
        try:
            for _ in range(600):
                held.append(socket.create_connection((LOOPBACK, frontend.http_port), timeout=5))
                selector.register(held[-1], selectors.EVENT_READ)
            refused: list[socket.socket] = []
            deadline = time.monotonic() + 20
            while True:  # until the front end has taken all 600 (its accepts come in bursts) and each refusal arrived
                for key, _ in selector.select(timeout=0.5):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket) and sock.recv(4096).startswith(b"HTTP/1.1 503 ")
                    selector.unregister(sock)
                    refused.append(sock)
                counted = frontend.metric("omnigen2_http_connections_refused_total")
                if counted == len(refused) and counted + (frontend.metric("omnigen2_http_connections") or 0) == 600:
                    break
                assert time.monotonic() < deadline, f"{len(refused)} refusals seen, the metrics say {counted}"
            assert 600 - 256 - 128 <= len(refused) <= 600 - 256  # one burst of accepts may pass the bound
            frontend.health()  # answers
            served = next(sock for sock in held if sock not in refused)
            served.sendall(b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert served.recv(64).startswith(b"HTTP/1.1 200 ")
        finally:
            for sock in held:
                sock.close()
        assert "at most 256 HTTP connections" in frontend.log_path.read_text()
        assert _post(frontend, {"prompt": "x", "size": "16x16", "steps": 1}) == 200  # places back once closed

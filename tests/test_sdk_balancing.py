"""Client-side load balancing in the SDK against real gRPC servers on loopback: gRPC's round_robin spreads calls over
the endpoints, client-side health checking skips a replica that says NOT_SERVING, and an idempotent call that meets
UNAVAILABLE is tried again on another replica, with the same request id."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health, health_pb2
from omnigen2 import AsyncOmniGen2Client, GenerationResult, OmniGen2Client, UnavailableError
from omnigen2.client import SERVICE, channel_target
from omnigen2.v1 import omnigen2_pb2 as pb
from omnigen2.v1 import omnigen2_pb2_grpc as pb_grpc

from tests.frontends import fake_server


class Replica(pb_grpc.OmniGen2Servicer):
    """Answers Generate with an empty result and names itself as the front end does (x-served-by)."""

    def __init__(self, name: str, unavailable: bool = False) -> None:
        self.name = name
        self.unavailable = unavailable
        self.request_ids: list[str] = []
        # Blocking Watch streams: the non-blocking default sends a Watch's first answer while holding the servicer's
        # lock, and a stream closing at that moment waits for the lock on the server's only event thread, which that
        # send waits for (grpcio-health-checking's sync servicer): one call ran into its deadline and pytest then hung
        # at exit on the stuck pool thread. The front end uses the asyncio servicer, which has no such wait.
        self.health = health.HealthServicer(experimental_non_blocking=False)
        self.health.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
        self.address = ""  # given when served: see the replicas fixture

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> pb.GenerateResponse:  # noqa: N802
        self.request_ids.append(dict(context.invocation_metadata())["x-request-id"])
        context.send_initial_metadata((("x-served-by", self.name),))  # then fail: as a replica whose Triton died
        if self.unavailable:
            context.abort(grpc.StatusCode.UNAVAILABLE, "Triton is not ready")
        return pb.GenerateResponse(seed=request.seed)

    def GenerateStream(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Iterator[pb.GenerateEvent]:  # noqa: N802
        yield pb.GenerateEvent(result=self.Generate(request, context))


@pytest.fixture
def replicas() -> Iterator[tuple[Replica, Replica]]:
    a, b = Replica("a"), Replica("b")
    with fake_server(a, health_servicer=a.health) as a.address, fake_server(b, health_servicer=b.health) as b.address:
        yield a, b


def test_targets() -> None:
    assert channel_target("127.0.0.1:1").balanced is False
    assert channel_target("dns:///omnigen2-headless:50051").balanced is True
    listed = channel_target(["127.0.0.1:1", "localhost:2"])
    assert (listed.address, listed.balanced, listed.authority) == ("ipv4:127.0.0.1:1,127.0.0.1:2", True, "127.0.0.1:1")
    assert channel_target("[::1]:1,[::1]:2").address == "ipv6:[::1]:1,[::1]:2"
    with pytest.raises(ValueError, match="do not mix"):
        channel_target(["127.0.0.1:1", "[::1]:2"])
    with pytest.raises(ValueError, match="host:port"):
        channel_target("127.0.0.1:1,nowhere:port")  # a name alone gets the default port (tests/test_sdk_calls.py)


def test_round_robin_spreads_calls_and_names_the_replica(replicas: tuple[Replica, Replica]) -> None:
    a, b = replicas
    with OmniGen2Client([a.address, b.address], timeout=10) as client:
        served = Counter(client.generate("x", seed=i).served_by for i in range(20))
    assert set(served) == {"a", "b"} and min(served.values()) >= 8  # the first calls go to the first one ready


def test_not_serving_replica_gets_no_calls(replicas: tuple[Replica, Replica]) -> None:
    a, b = replicas
    a.health.set(SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
    with OmniGen2Client(f"{a.address},{b.address}", timeout=10) as client:
        assert {client.generate("x", seed=i).served_by for i in range(10)} == {"b"}
        a.health.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
        # The health watch stream tells the channel: waited for (a fixed 0.5 s could be short on a loaded machine).
        deadline = time.monotonic() + 10
        while client.generate("x").served_by != "a":
            assert time.monotonic() < deadline, "the replica back to SERVING got no calls"
            time.sleep(0.05)
        assert {client.generate("x", seed=i).served_by for i in range(10)} == {"a", "b"}


def test_unavailable_is_tried_again_on_the_other_replica(replicas: tuple[Replica, Replica]) -> None:
    a, b = replicas
    a.unavailable = True  # still SERVING by health: only the call's status says otherwise
    with OmniGen2Client([a.address, b.address], timeout=10) as client:
        results = [client.generate("x", seed=i) for i in range(10)]
    assert {r.served_by for r in results} == {"b"}
    assert [r.seed for r in results] == list(range(10))
    assert len(b.request_ids) == 10 and set(a.request_ids) <= set(b.request_ids)  # a repeat keeps its request id
    assert {r.request_id for r in results} == set(b.request_ids)


def test_a_generation_without_seed_gets_one_and_stays_idempotent(replicas: tuple[Replica, Replica]) -> None:
    a, b = replicas
    a.unavailable = True
    with OmniGen2Client([a.address, b.address], timeout=10) as client:
        seeds = {client.generate("x").seed for _ in range(4)}
    assert len(seeds) == 4 and all(0 <= seed < 2**63 for seed in seeds)


def test_no_replica_left_is_unavailable(replicas: tuple[Replica, Replica]) -> None:
    a, b = replicas
    a.unavailable = b.unavailable = True
    with OmniGen2Client([a.address, b.address], timeout=10, retries=2) as client, pytest.raises(UnavailableError):
        client.generate("x", seed=1)
    assert len(a.request_ids) + len(b.request_ids) == 3


def test_streams_and_the_asyncio_client_fail_over_too(replicas: tuple[Replica, Replica]) -> None:
    a, b = replicas
    a.unavailable = True  # fails before the first event: the stream may be repeated elsewhere
    with OmniGen2Client([a.address, b.address], timeout=10) as client:
        streamed = [list(client.stream("x", seed=i))[-1] for i in range(4)]
    assert all(isinstance(r, GenerationResult) and r.served_by == "b" for r in streamed)

    async def generate() -> list[GenerationResult]:
        async with AsyncOmniGen2Client([a.address, b.address], timeout=10) as client:
            return [await client.generate("x", seed=i) for i in range(4)]

    assert {r.served_by for r in asyncio.run(generate())} == {"b"}

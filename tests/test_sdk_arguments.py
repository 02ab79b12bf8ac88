"""The SDK's checks of its own arguments (client/omnigen2/): a timeout of inf is no deadline and NaN or none left
is refused naming `timeout`, and an option protobuf cannot carry is refused naming the option. Before, inf and NaN
failed every call at once with DeadlineExceededError, and seed=2**63 with a bare "Value out of range"."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from omnigen2 import AsyncOmniGen2Client, OmniGen2Client
from omnigen2.client import _seeded
from omnigen2.messages import build_request, build_understand_request
from omnigen2.v1 import omnigen2_pb2 as pb
from omnigen2.v1 import omnigen2_pb2_grpc as pb_grpc

from tests.frontends import fake_server


class Info(pb_grpc.OmniGen2Servicer):
    def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.ServicerContext) -> pb.ModelInfo:  # noqa: N802
        return pb.ModelInfo(model="OmniGen2")


@pytest.fixture
def address() -> Iterator[str]:
    with fake_server(Info()) as address:
        yield address


@pytest.mark.parametrize("timeout", [float("inf"), 1e12, None, 30.0])
def test_a_timeout_of_inf_or_past_grpcs_deadlines_waits_forever(address: str, timeout: float | None) -> None:
    with OmniGen2Client(address, timeout=timeout, retries=0) as client:
        assert client.info().model == "OmniGen2"


@pytest.mark.parametrize("timeout", [float("nan"), 0.0, -1.0, float("-inf")])
@pytest.mark.parametrize("kind", [OmniGen2Client, AsyncOmniGen2Client])
def test_a_timeout_that_leaves_no_time_is_refused(kind: type[OmniGen2Client], timeout: float) -> None:
    with pytest.raises(ValueError, match=r"^timeout: "):
        kind("127.0.0.1:1", timeout=timeout)


@pytest.mark.parametrize(
    ("options", "error", "name"),
    [
        ({"seed": 2**63}, ValueError, "seed"),
        ({"seed": -(2**64)}, ValueError, "seed"),
        ({"steps": 2**31}, ValueError, "steps"),
        ({"text_guidance_scale": 10**400}, ValueError, "text_guidance_scale"),
        ({"cfg_range": (0.0, 10**400)}, ValueError, "cfg_range"),
        ({"width": "64"}, TypeError, "width"),
    ],
)
def test_generation_options_protobuf_cannot_carry_are_refused_by_name(
    options: dict[str, object], error: type[Exception], name: str
) -> None:
    with pytest.raises(error, match=rf"^{name}: "):
        build_request("x", [], options)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("options", "name"), [({"seed": 2**63}, "seed"), ({"max_new_tokens": 2**31}, "max_new_tokens")]
)
def test_understand_options_protobuf_cannot_carry_are_refused_by_name(options: dict[str, object], name: str) -> None:
    with pytest.raises(ValueError, match=rf"^{name}: "):
        build_understand_request("x", [], options)  # type: ignore[arg-type]


def test_options_in_range_are_sent() -> None:
    request = build_request("x", [], {"seed": 2**63 - 1, "steps": 3, "cfg_range": (0.0, 1.0)})
    assert (request.seed, request.steps, request.cfg_range.end) == (2**63 - 1, 3, 1.0)
    assert build_understand_request("x", [], {"seed": 0, "stop": ["a"]}).stop == ["a"]


def test_the_sdks_drawn_seeds_survive_json_doubles() -> None:
    """A seed the SDK draws (so a retry on another replica repeats the generation) stays below 2^53, which JSON
    readers holding doubles keep exactly; before, drawn in [0, 2^63). A caller's seed passes as given."""
    seeds = [_seeded({})["seed"] for _ in range(1000)]
    assert all(isinstance(seed, int) and 0 <= seed < 2**53 for seed in seeds) and len(set(seeds)) > 990
    assert _seeded({"seed": 2**63 - 1})["seed"] == 2**63 - 1

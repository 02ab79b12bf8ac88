"""Understand through the whole stack (SDK -> front end -> tritonserver -> `mllm`), against transformers' own
`generate` on the golden checkpoint, token for token."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from omnigen2 import AsyncOmniGen2Client, ChatTurn, InvalidArgumentError, OmniGen2Client, UnderstandResult
from omnigen2.v1 import omnigen2_pb2 as pb
from omnigen2.v1 import omnigen2_pb2_grpc as pb_grpc
from PIL import Image

from serving.frontend.process import FrontendProcess
from serving.pipeline.chat_request import DEFAULT_CHAT_LIMITS, ChatMessage, ChatPart, ChatRequest
from serving.triton.cpu_lane import CpuLane
from serving.triton.launcher import TritonServer
from serving.triton.watchdog import stub_processes
from tests.integration.lane_locks import lane_locks
from tests.integration.triton_stats import executions, requests_running
from tests.understand_reference import transformers_generate


@pytest.fixture(scope="module")
def client(api: FrontendProcess) -> OmniGen2Client:
    return OmniGen2Client(api.address, timeout=120)


def _conversation(golden: Path) -> tuple[list[ChatTurn], ChatRequest]:
    """The same conversation for the SDK and for the reference."""
    first, second = golden / "edit_one_image_input0.png", golden / "in_context_two_images_input1.png"
    turns = [
        ChatTurn("system", ["You are terse."]),
        ChatTurn("user", [first, "And this one?", second.read_bytes()]),
        ChatTurn("assistant", ["Two pictures."]),
        ChatTurn("user", ["What is in them?"]),
    ]
    request = ChatRequest(
        messages=[
            ChatMessage("system", [ChatPart(text="You are terse.")]),
            ChatMessage("user", [ChatPart(image=0), ChatPart(text="And this one?"), ChatPart(image=1)]),
            ChatMessage("assistant", [ChatPart(text="Two pictures.")]),
            ChatMessage("user", [ChatPart(text="What is in them?")]),
        ],
        images=[Image.open(first), Image.open(second)],
    )
    return turns, request


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.7, "top_p": 0.95, "top_k": 40, "seed": 77}])
def test_served_answer_equals_transformers_generate(
    client: OmniGen2Client, golden: Path, tiny_checkpoint: Path, sampling: dict[str, float]
) -> None:
    turns, reference = _conversation(golden)
    *deltas, result = list(client.understand_stream(turns, max_new_tokens=32, **sampling))  # type: ignore[arg-type]
    for name, value in sampling.items():
        setattr(reference, name, value)
    reference.max_new_tokens = 32
    assert isinstance(result, UnderstandResult)
    assert result.token_ids == transformers_generate(tiny_checkpoint, reference)
    assert "".join(deltas) == result.text  # type: ignore[arg-type]
    assert result.completion_tokens == len(result.token_ids) and result.prompt_tokens > 20
    assert result.finish_reason in ("stop", "length")
    if "seed" in sampling:
        assert result.seed == sampling["seed"]


def test_unary_question_about_image_files(client: OmniGen2Client, golden: Path) -> None:
    path = str(golden / "edit_one_image_input0.png")
    first = client.understand("What is this?", [path], max_new_tokens=8)
    again = client.understand("What is this?", [path], max_new_tokens=8)
    assert first.token_ids == again.token_ids and len(first.token_ids) <= 8  # greedy: deterministic
    text_only = client.understand("Hello", max_new_tokens=4)
    assert text_only.prompt_tokens < first.prompt_tokens  # no vision tokens


def test_async_client_understands(api: FrontendProcess, golden: Path) -> None:
    async def run() -> list[UnderstandResult]:
        async with AsyncOmniGen2Client(api.address, timeout=120) as client:
            return list(
                await asyncio.gather(*(client.understand(f"Question {i}?", max_new_tokens=6) for i in range(3)))
            )

    results = asyncio.run(run())
    assert all(r.completion_tokens >= 1 for r in results)


def _image_part(data: bytes) -> pb.ContentPart:
    return pb.ContentPart(image=pb.Image(data=data))


def _png(golden: Path) -> bytes:
    return (golden / "edit_one_image_input0.png").read_bytes()


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"content": [_image_part(b"junk"), pb.ContentPart(text="?")]}, "messages[0].content[0].image.data"),
        ({"content": [pb.ContentPart()]}, "messages[0].content[0]"),
        ({"role": 9}, "messages[0].role"),
        ({"max_new_tokens": DEFAULT_CHAT_LIMITS.max_new_tokens + 1}, "max_new_tokens"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"stop": ["x" * 65]}, "stop"),
        ({"max_pixels": 10}, "max_pixels"),
        ({"content": [pb.ContentPart(text="word " * 3000)]}, "messages"),  # found by the model: prompt tokens
    ],
)
def test_invalid_understand_fields_are_named(
    api: FrontendProcess, request_fields: dict[str, object], field: str
) -> None:
    message = pb.ChatMessage(role=pb.ROLE_USER, content=[pb.ContentPart(text="What?")])
    request = pb.UnderstandRequest(messages=[message], max_new_tokens=4)
    for name, value in request_fields.items():
        target = message if name in ("content", "role") else request
        if name in ("content", "stop"):
            del getattr(target, name)[:]
            getattr(target, name).extend(value)
        else:
            setattr(target, name, value)
    request.messages[0].CopyFrom(message)
    with pytest.raises(grpc.RpcError) as raised:
        list(pb_grpc.OmniGen2Stub(grpc.insecure_channel(api.address)).Understand(request, timeout=60))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details().startswith(f"{field}:")


def test_too_many_images_are_refused_without_decoding_them(client: OmniGen2Client, golden: Path) -> None:
    with pytest.raises(InvalidArgumentError) as raised:
        client.understand("Compare", [_png(golden)] * 5 + [b"never decoded"], max_new_tokens=2)
    assert [v.field for v in raised.value.violations] == ["messages"]


def test_cancelled_answer_frees_the_model(client: OmniGen2Client, triton: TritonServer) -> None:
    """Generation is one at a time per instance: if the cancelled answer kept running, the next would wait.

    Greedy decoding of this prompt never ends by itself on the golden weights: 2048 tokens take about 2.7 s. The
    test steers the answer with the CPU lane, which it takes for each token, instead of timing the next answer (a
    1.5 s bound, tight on a loaded machine): held while the front end's stop reaches `mllm`, then let go until the
    answer has taken it (its token in progress), then held again. An answer that went on waits for the lane for its
    next token, forever; one that saw the stop ends without it."""
    assert triton.process is not None
    (mllm,) = stub_processes(triton.process.pid)["mllm"]
    lane = CpuLane(triton.model_repository, enabled=True)
    stream = client.understand_stream("Talk for a long time", max_new_tokens=2048)
    next(stream)
    with contextlib.ExitStack() as held:
        lane.acquire()
        held.callback(lane.release)  # a failure must not leave mllm blocked on the lane
        calls = executions(triton, "mllm")
        stream.close()
        _until(lambda: executions(triton, "mllm") > calls, "the front end's stop never reached mllm")
        # Now blocked on the lane for its next token, or ended (the stop came between two tokens).
        _until(
            lambda: "waits" in lane_locks(triton, mllm) or not requests_running(triton, "mllm"),
            "the answer neither waited for the lane nor ended",
        )
        lane.release()
        # Took it (a woken waiter leaves /proc/locks before it holds the lock: taking it back then would win).
        _until(lambda: "holds" in lane_locks(triton, mllm) or not requests_running(triton, "mllm"), "never taken")
        lane.acquire()  # its token done: the answer has looked at its stop since
        _until(lambda: not requests_running(triton, "mllm"), "the cancelled answer kept running")
    assert client.understand("Short", max_new_tokens=2).completion_tokens >= 1


def _until(done: Callable[[], bool], failure: str, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, failure
        time.sleep(0.01)


def test_a_cancelled_answer_waiting_for_its_turn_gives_its_place_back_at_once(
    api: FrontendProcess, client: OmniGen2Client, triton: TritonServer
) -> None:
    """An answer waiting behind another for the model has done no work: cancelled, its place and tokens come back
    within moments (the model used to see the stop only once the running answer had ended, or the front end gave
    up at the stop grace, 10 s), and the running answer ends as it would have. The test holds the CPU lane, which
    the running answer takes for each token, while the waiting one is cancelled: the running answer cannot end
    meanwhile (a fast one once did on CI, and its place went too, so `alone` was never seen again)."""

    def held() -> tuple[float, float]:
        tokens = api.metric("omnigen2_admitted_chat_tokens") or 0
        return api.metric("omnigen2_in_flight_requests") or 0, tokens

    expired = api.metric("omnigen2_stop_grace_expired_total") or 0
    lane = CpuLane(triton.model_repository, enabled=True)
    running = client.understand_stream("Talk for a long time", max_new_tokens=1024)
    next(running)
    alone = held()
    with contextlib.ExitStack() as paused:
        lane.acquire()  # between two of the running answer's tokens
        paused.callback(lane.release)
        waiting = pb_grpc.OmniGen2Stub(grpc.insecure_channel(api.address)).Understand(
            pb.UnderstandRequest(
                messages=[pb.ChatMessage(content=[pb.ContentPart(text="hello there")])], max_new_tokens=8
            )
        )
        while held()[0] < alone[0] + 1:
            time.sleep(0.01)
        _until(lambda: requests_running(triton, "mllm") == 2, "the waiting answer never reached mllm")
        waiting.cancel()
        cancelled = time.monotonic()
        # Back to exactly the running answer's place and tokens. The deadline only ends a failing wait: below the
        # 10 s stop grace, above what a loaded 2-core machine needs (2 s was not always enough there).
        while held() != alone:
            assert time.monotonic() - cancelled < 8, "the waiting answer kept its place"
            time.sleep(0.01)
    *_, result = running  # paused on the lane above, so it had not ended
    assert isinstance(result, UnderstandResult)
    assert result.finish_reason == "length" and result.completion_tokens == 1024
    assert waiting.code() == grpc.StatusCode.CANCELLED
    assert (api.metric("omnigen2_stop_grace_expired_total") or 0) == expired


def test_streams_cancelled_by_callers_never_take_the_front_end_down(api: FrontendProcess) -> None:
    """Regression: the access log read the call context after a cancel and grpcio segfaulted, within a few tries.

    A short timeout: once the front end is gone the SDK would retry UNAVAILABLE until its deadline."""
    client = OmniGen2Client(api.address, timeout=10)
    for _ in range(40):
        stream = client.understand_stream("Talk for a long time", max_new_tokens=2048)
        next(stream)
        stream.close()
        assert client.understand("Short", max_new_tokens=2).completion_tokens >= 1
    assert api.process is not None and api.process.poll() is None, "the front end died"


def test_model_info_reports_understand_limits(client: OmniGen2Client) -> None:
    info = client.info()
    assert info.understand_limits.max_images == DEFAULT_CHAT_LIMITS.max_images
    assert info.understand_limits.max_new_tokens == DEFAULT_CHAT_LIMITS.max_new_tokens
    assert info.understand_defaults.max_new_tokens == 512 and info.understand_defaults.temperature == 0.0


def test_temperatures_below_the_minimum_decode_greedily(client: OmniGen2Client) -> None:
    """1e-40 is inside 0..2; dividing the logits by it gave inf/NaN probabilities and INTERNAL."""
    greedy = client.understand("Describe a cat", max_new_tokens=8, seed=1)
    tiny = client.understand("Describe a cat", max_new_tokens=8, seed=2, temperature=1e-40)
    assert tiny.token_ids == greedy.token_ids

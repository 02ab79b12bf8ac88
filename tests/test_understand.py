"""Visual understanding in-process: chat inputs, streaming text, stop strings, and parity with transformers'
own `generate` on the golden checkpoint (greedy, and sampling with a seed), token for token."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from serving.errors import InvalidArgumentError
from serving.pipeline.chat import StopStrings, TextDeltas
from serving.pipeline.chat_request import ChatLimits, ChatMessage, ChatPart, ChatRequest, chat_request_from_params
from serving.pipeline.understand import ChatResult, Understander
from tests.understand_reference import transformers_generate


@pytest.fixture(scope="module")
def understander(tiny_checkpoint: Path) -> Understander:
    return Understander.from_dirs(tiny_checkpoint / "mllm", tiny_checkpoint / "processor")


def _question(golden: Path, text: str = "What is in the picture?", **options: object) -> ChatRequest:
    images = [Image.open(golden / "edit_one_image_input0.png"), Image.open(golden / "in_context_two_images_input1.png")]
    messages = [
        ChatMessage("system", [ChatPart(text="You are terse.")]),
        ChatMessage("user", [ChatPart(image=0), ChatPart(text="And this one?"), ChatPart(image=1)]),
        ChatMessage("assistant", [ChatPart(text="Two pictures.")]),
        ChatMessage("user", [ChatPart(text=text)]),
    ]
    return ChatRequest(messages=messages, images=images, **options)  # type: ignore[arg-type]


def _run(understander: Understander, request: ChatRequest) -> tuple[list[str], ChatResult]:
    *pieces, result = list(understander.stream(request))
    assert isinstance(result, ChatResult) and all(isinstance(p, str) for p in pieces)
    return pieces, result  # type: ignore[return-value]


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.8, "top_p": 0.9, "top_k": 50, "seed": 123}])
def test_matches_transformers_generate_token_for_token(
    understander: Understander, tiny_checkpoint: Path, golden: Path, sampling: dict[str, object]
) -> None:
    request = _question(golden, max_new_tokens=24, **sampling)
    pieces, result = _run(understander, request)
    assert result.token_ids == transformers_generate(tiny_checkpoint, request)
    assert (
        "".join(pieces)
        == result.text
        == understander.encoder.tokenizer.decode(result.token_ids, skip_special_tokens=True)
    )
    assert result.finish_reason in ("stop", "length") and result.prompt_tokens > 20


def test_small_images_follow_the_checkpoints_minimum_pixels(
    understander: Understander, tiny_checkpoint: Path, golden: Path
) -> None:
    """A 30x30 image is below the checkpoint's min_pixels (3136): it is scaled up to a 4x4 patch grid, not 2x2."""
    small = Image.open(golden / "edit_one_image_input0.png").crop((0, 0, 30, 30))
    request = ChatRequest([ChatMessage("user", [ChatPart(image=0), ChatPart(text="What?")])], [small], max_new_tokens=8)
    grid = understander.encoder.encode(request).image_grid_thw
    assert grid is not None and grid.tolist() == [[1, 4, 4]]
    assert _run(understander, request)[1].token_ids == transformers_generate(tiny_checkpoint, request)


def test_max_pixels_lowers_the_checkpoints_bound_only(understander: Understander, golden: Path) -> None:
    image = Image.open(golden / "edit_one_image_input0.png")  # 80x64 -> 84x56 pixels (multiples of 28)
    ask = [ChatMessage("user", [ChatPart(image=0)])]
    encoder = understander.encoder
    assert encoder.vision_size(ChatRequest(ask, [image])) == {"shortest_edge": 3136, "longest_edge": 50176}
    grids = [encoder.encode(ChatRequest(ask, [image], max_pixels=m)).image_grid_thw for m in (10**6, 3136)]
    # 84x56 fits; a budget of 3136 scales it down (floored to 28: 56x28), as transformers' smart_resize does.
    assert [g.tolist() for g in grids if g is not None] == [[[1, 4, 6]], [[1, 2, 4]]]
    with pytest.raises(InvalidArgumentError, match="minimum of 3136") as info:
        encoder.encode(ChatRequest(ask, [image], max_pixels=3000))
    assert info.value.field == "max_pixels"


def test_sampling_follows_the_seed(understander: Understander, golden: Path) -> None:
    runs = [_run(understander, _question(golden, max_new_tokens=16, temperature=1.0, seed=s))[1] for s in (1, 1, 2)]
    assert runs[0].token_ids == runs[1].token_ids != runs[2].token_ids


def test_stop_string_ends_the_answer_before_it(understander: Understander, golden: Path) -> None:
    _, full = _run(understander, _question(golden, max_new_tokens=24, temperature=1.0, seed=9))
    stop = full.text[6:9]
    pieces, stopped = _run(understander, _question(golden, max_new_tokens=24, temperature=1.0, seed=9, stop=[stop]))
    assert stopped.finish_reason == "stop_string" and stopped.text == full.text[: full.text.index(stop)]
    assert "".join(pieces) == stopped.text and len(stopped.token_ids) < len(full.token_ids)


def test_cancellation_stops_generation(understander: Understander, golden: Path) -> None:
    calls = iter(range(1000))
    *_, result = understander.stream(_question(golden, max_new_tokens=500), cancelled=lambda: next(calls) >= 3)
    assert isinstance(result, ChatResult) and result.finish_reason == "cancelled" and len(result.token_ids) < 10


def test_a_cancelled_answer_stops_waiting_for_its_turn(understander: Understander, golden: Path) -> None:
    """While another answer holds the model (for 5 s at most), a cancelled one ends without running, at once."""
    other_ended = threading.Event()

    def other_answer() -> None:
        with understander.lock:
            other_ended.wait(5)

    other = threading.Thread(target=other_answer)
    other.start()
    while not understander.lock.locked():
        time.sleep(0.01)
    started = time.monotonic()
    leaves = started + 0.1  # the caller cancels 0.1 s in
    *pieces, result = understander.stream(
        _question(golden, max_new_tokens=8), cancelled=lambda: time.monotonic() > leaves
    )
    waited = time.monotonic() - started
    other_ended.set()
    other.join()
    assert isinstance(result, ChatResult) and result.finish_reason == "cancelled"
    assert result.token_ids == [] and pieces == [] and waited < 3


def test_an_answer_waiting_for_its_turn_asks_for_its_cancellation_seldom(
    understander: Understander, golden: Path
) -> None:
    """The stop (a local event) is looked at every TURN_POLL_S, the caller's cancellation (a round trip to the server
    in Triton) every TURN_CANCEL_POLL_S: before, both every 20 ms, 50 a second per waiting answer."""
    asked = 0

    def stopped() -> bool:
        return time.monotonic() > stops  # a stop request comes 1 s in

    def cancelled() -> bool:  # as Triton's requests' is_cancelled(), true once stopped too (serving/triton/stops.py)
        nonlocal asked
        asked += 1
        return stopped()

    with understander.lock:  # another answer holds the model
        started = time.monotonic()
        stops = started + 1.0
        *pieces, result = understander.stream(_question(golden, max_new_tokens=8), cancelled, stopped)
        waited = time.monotonic() - started
    assert isinstance(result, ChatResult) and result.finish_reason == "cancelled" and pieces == []
    assert waited < 1.5 and 1 <= asked <= 8  # 5 at TURN_CANCEL_POLL_S, and the result's own look; 50 before


def test_text_deltas_concatenate_to_the_decoded_text(tiny_checkpoint: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint / "processor")
    ids = torch.randint(0, len(tokenizer), (300,), generator=torch.Generator().manual_seed(0)).tolist()
    deltas = TextDeltas(tokenizer)
    text = "".join(deltas.push(i) for i in ids) + deltas.flush()
    assert text == tokenizer.decode(ids, skip_special_tokens=True)


def test_stop_strings_hold_back_possible_starts() -> None:
    stops = StopStrings(["END"])
    assert stops.feed("abcE") == "abc"  # "E" may begin "END"
    assert stops.feed("x") == "Ex"
    assert stops.feed("yEN") == "y" and stops.feed("D and more") == "" and stops.stopped
    assert stops.text == "abcExy"


def test_violations_name_the_fields() -> None:
    limits = ChatLimits(max_images=1, max_new_tokens=100)
    request = ChatRequest(
        messages=[
            ChatMessage("robot", [ChatPart(text="hi")]),
            ChatMessage("system", [ChatPart(image=0)]),
            ChatMessage("user", [ChatPart(image=1), ChatPart(), ChatPart(text="?")]),
        ],
        max_new_tokens=0,
        temperature=-1.0,
        top_p=0.0,
        stop=[""],
    )
    fields = [e.field for e in request.violations(limits)]
    assert fields == [
        "messages[0].role",
        "messages[1].content[0]",
        "messages[2].content[1]",
        "messages",
        "max_new_tokens",
        "temperature",
        "top_p",
        "stop",
    ]


def test_wire_params_must_reference_each_image_once() -> None:
    params = {"messages": [{"role": "user", "content": [{"image": 0}, {"image": 0}]}]}
    with pytest.raises(InvalidArgumentError, match="exactly once"):
        chat_request_from_params(params, [Image.new("RGB", (32, 32))] * 2)
    with pytest.raises(InvalidArgumentError) as raised:
        chat_request_from_params({"messages": [{"content": []}]}, [])
    assert raised.value.field == "messages"
    assert 0 <= chat_request_from_params({"messages": []}, []).seed < 2**63


def test_prompt_token_limit(understander: Understander, golden: Path) -> None:
    long = _question(golden, text="word " * 3000, max_new_tokens=1)
    with pytest.raises(InvalidArgumentError, match="prompt tokens"):
        list(understander.stream(long))

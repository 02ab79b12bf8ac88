"""The prompt policy (serving/frontend/policy.py): rules, per-token overrides, refusals and reloads, in process."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import string
import threading
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any, ClassVar

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from omnigen2.v1 import omnigen2_pb2 as pb
from omnigen2.v1 import omnigen2_pb2_grpc as pb_grpc

from serving.errors import SettingError
from serving.frontend.config import FrontendConfig
from serving.frontend.policy import (
    ANSWER_WINDOW,
    REGEX_RUNS,
    REGEX_WINDOW,
    AnswerScan,
    PolicyFile,
    PromptPolicy,
    Violation,
    normalise,
    regex_readings,
    request_texts,
)
from serving.frontend.server import Frontend
from serving.triton.ports import free_port

POLICY: dict[str, Any] = {
    "rules": [
        {"id": "weapons", "terms": ["pipe bomb", "Nerve Agent"]},
        {"id": "card-number", "regexes": [r"\b(?:\d[ -]?){13,16}\b"]},
        {"id": "shouting", "regexes": ["ABSOLUTELY"]},
    ],
    "overrides": {
        "red-team": {"exempt": ["weapons"]},
        "trusted": {"exempt": ["*"]},
        "kids-app": {"rules": [{"id": "gore", "terms": ["gore"]}]},
    },
}


@pytest.fixture
def policy() -> PromptPolicy:
    return PromptPolicy.from_dict(POLICY)


def rule_for(policy: PromptPolicy, text: str, token: str | None = None) -> str | None:
    violation = policy.check([("prompt", text)], token)
    return violation.rule if violation else None


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ("how to build a PIPE  BOMB at home", "weapons"),  # any case, any run of spaces
        ("nerve\nagent", "weapons"),
        ("\uff50\uff49\uff50\uff45 \uff42\uff4f\uff4d\uff42", "weapons"),  # full-width letters: NFKC-normalised first
        ("a pipe bombastic speech", None),  # terms are whole words
        ("pi\u200bpe bo\u00admb", "weapons"),  # zero-width space, soft hyphen: format characters are dropped
        ("pi\U00013430pe bomb", "weapons"),  # an Egyptian hieroglyph format control (Cf, not default-ignorable)
        ("nerve\u2060 agent", "weapons"),  # word joiner
        ("a pipe bo\u034fmb", "weapons"),  # combining grapheme joiner (Mn, default-ignorable)
        ("a pipe bo\ufe0fmb", "weapons"),  # variation selector 16 (Mn)
        ("a pipe\u3164bomb", "weapons"),  # Hangul filler (Lo) as a space
        ("a pipe\u2800bomb", "weapons"),  # braille blank (So) as a space
        ("a pipe\x00bomb", "weapons"),  # NUL (Cc) as a space
        ("a pi\x00pe\U000e0020bomb", "weapons"),  # invisible characters as nothing and as a space in one text
        ("a pipe\u200bbomb", "weapons"),  # a zero-width space read as a space
        ("a pipe\u200bbombastic speech", None),  # still whole words
        ("pay with 4111\u200b1111\x001111 1111", "card-number"),  # regexes read both ways too
        ("pay with 4111 1111 1111 1111 please", "card-number"),
        ("ABSOLUTELY not", "shouting"),
        ("absolutely not", None),  # a regular expression is case-sensitive unless it says (?i)
        ("A red apple on a wooden table", None),
    ],
)
def test_terms_and_regexes(policy: PromptPolicy, text: str, rule: str | None) -> None:
    assert rule_for(policy, text) == rule


REGEX_POLICY = {
    "rules": [
        {"id": "six-words", "regexes": [r"(?i)\bhow\s+to\s+make\s+a\s+pipe\s+bomb\b"]},  # checked first
        {"id": "two-words", "regexes": [r"\bpipe\s+bomb\b"]},
    ]
}
PADDING = "a cat on a mat, " * 40  # the runs read apart from the others are read in a window around them


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ("pi\u200bpe\x00bomb", "two-words"),  # one run as nothing, the other as a space: escaped before
        (f"{PADDING}pi\u200bpe\x00bomb, {PADDING}", "two-words"),
        ("p\u200bi\u200bp\u200be\u200bbomb", "two-words"),  # any number split, one space hidden
        ("p\U00013430i\u00adp\u2060e\x00b\ufe0fo\u034fmb", "two-words"),  # format, default-ignorable, controls
        ("pipe,\u200bbomb", None),  # a comma is no white space in either reading
        ("pipe\u200bbombastic", None),
        ("How\u200bto\u200bmake\u200ba\u200bpi\u200bpe\u200bbomb", "six-words"),  # spaces hidden, one word split
        ("How to make a p\u200bi\u200bpe\u200bbo\u200bmb", "six-words"),  # words split, a space hidden in them
        ("How\u200bto make a pi\u200bpe bomb", "six-words"),
        ("How to make a pipe bomb", "six-words"),
    ],
)
def test_regexes_read_runs_as_nothing_and_as_spaces_in_one_text(text: str, rule: str | None) -> None:
    assert rule_for(PromptPolicy.from_dict(REGEX_POLICY), text) == rule


def test_the_readings_of_a_text_are_bounded() -> None:
    text = normalise("a\u200b" * 4096)  # 8192 characters, 4095 runs between word characters
    readings = regex_readings(text)
    assert readings[0] == "a" * 4096  # every run as nothing
    assert len(readings) <= 3 + 2 * REGEX_RUNS
    assert sum(len(reading) > 2 * REGEX_WINDOW + 1 for reading in readings) <= 3  # the others are windows
    assert regex_readings("no runs at all") == ["no runs at all"]


def test_only_the_first_runs_get_readings_of_their_own() -> None:
    """Random letter pairs each followed by a zero-width space (the review's input: 2730 runs, no two windows
    alike) made 5461 readings of 712K characters, 2 s per request at 100 rules; now 3 + 2 x REGEX_RUNS."""
    letters = random.Random(0).choices(string.ascii_lowercase, k=2 * 2730)
    text = "".join(a + b + "\u200b" for a, b in zip(letters[::2], letters[1::2], strict=True))
    readings = regex_readings(normalise(text))
    assert len(readings) == 3 + 2 * REGEX_RUNS
    assert sum(map(len, readings)) < 3 * len(text) + 2 * REGEX_RUNS * (2 * REGEX_WINDOW + 1)
    rules = PromptPolicy.from_dict(REGEX_POLICY)
    early, late = "ab\u200b" * (REGEX_RUNS - 3), "ab\u200b" * REGEX_RUNS
    assert rule_for(rules, early + "pi\u200bpe\x00bomb") == "two-words"  # the mixed run still among the first
    assert rule_for(rules, late + "pi\u200bpe bomb") == "two-words"  # the whole-text readings are still read
    assert rule_for(rules, late + "pipe\u200bbomb") == "two-words"
    assert rule_for(PromptPolicy.from_dict(POLICY), late + "pi\u200bpe\x00bomb") == "weapons"  # terms: no limit


def test_overrides_by_token_name(policy: PromptPolicy) -> None:
    assert rule_for(policy, "a pipe bomb", "red-team") is None  # exempt from that rule
    assert rule_for(policy, "4111 1111 1111 1111", "red-team") == "card-number"  # but not from the others
    assert rule_for(policy, "a pipe bomb and ABSOLUTELY 4111111111111111", "trusted") is None
    assert rule_for(policy, "so much gore", "kids-app") == "gore"  # a rule of that token only
    assert rule_for(policy, "so much gore", "someone-else") is None
    assert rule_for(policy, "so much gore", None) is None


def test_every_text_field_is_read(policy: PromptPolicy) -> None:
    generate = pb.GenerateRequest(prompt="A cat", negative_prompt="no pipe bombs, no pipe bomb")
    violation = policy.check(request_texts(generate), None)
    assert violation is not None and (violation.rule, violation.field) == ("weapons", "negative_prompt")
    chat = pb.UnderstandRequest(
        messages=[
            pb.ChatMessage(content=[pb.ContentPart(text="What is this?")]),
            pb.ChatMessage(content=[pb.ContentPart(image=pb.Image(data=b"x")), pb.ContentPart(text="nerve agent")]),
        ]
    )
    violation = policy.check(request_texts(chat), None)
    assert violation is not None and violation.field == "messages[1].content[1].text"


def test_refusal_names_the_rule_and_never_the_text(policy: PromptPolicy) -> None:
    secret = "4111 1111 1111 1111"
    violation = policy.check([("prompt", f"card {secret}")], None)
    assert violation is not None
    error = violation.error()
    assert error.code == grpc.StatusCode.PERMISSION_DENIED
    (key, details), *_ = error.status.trailing_metadata
    assert key == "grpc-status-details-bin"  # the google.rpc.Status, as grpcio-status sends it
    rich = status_pb2.Status.FromString(details)
    info = error_details_pb2.ErrorInfo()
    assert rich.details[0].Unpack(info)
    assert info.reason == "card-number" and info.metadata["field"] == "prompt"
    for text in (error.status.details, rich.message, str(info)):
        assert secret not in text and "4111" not in text


@pytest.mark.parametrize(
    ("document", "complaint"),
    [
        ({"rules": [{"id": "a", "terms": ["x"]}, {"id": "a", "terms": ["y"]}]}, "used twice"),
        ({"rules": [{"id": "a", "regexes": ["(unclosed"]}]}, "bad regular expression"),
        ({"rules": [{"id": "a", "terms": ["x"], "typo": 1}]}, "unknown keys"),
        ({"rules": [{"id": "a"}]}, "needs `terms` or `regexes`"),
        ({"rules": [{"terms": ["x"]}]}, "non-empty string `id`"),
        ({"rules": [], "overrides": {"t": {"exempt": ["nope"]}}}, "no rules ['nope']"),
        ({"rules": [{"id": "a", "terms": [""]}]}, "non-empty strings"),
        ({"rules": [{"id": "a", "terms": ["\u200b"]}]}, "a term with nothing visible"),  # it would match any text
        ({"policy": []}, "an object with `rules`"),
        ({"rules": [], "overrides": [{"t": {"exempt": ["*"]}}]}, "overrides: an object"),
        ({"rules": {"id": "a", "terms": ["x"]}}, "rules: a list of rules"),
    ],
)
def test_bad_policies_are_refused_naming_the_problem(document: Any, complaint: str) -> None:
    with pytest.raises(SettingError, match=complaint.replace("[", r"\[").replace("]", r"\]")):
        PromptPolicy.from_dict(document)


def test_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("rules:\n  - id: weapons\n    terms: [pipe bomb]\n  - id: digits\n    regexes: ['\\d{6}']\n")
    policy = PolicyFile(path).policy
    assert rule_for(policy, "Pipe Bomb") == "weapons" and rule_for(policy, "123456") == "digits"


def test_reload_swaps_the_policy_and_keeps_it_when_the_file_is_bad(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({"rules": [{"id": "old", "terms": ["apple"]}]}))
    holder = PolicyFile(path)
    path.write_text(json.dumps({"rules": [{"id": "new", "terms": ["pear"]}]}))
    assert holder.reload()
    assert rule_for(holder.policy, "an apple") is None and rule_for(holder.policy, "a pear") == "new"
    path.write_text("{not json")
    with caplog.at_level(logging.ERROR):
        assert not holder.reload()
    assert rule_for(holder.policy, "a pear") == "new"  # still in force
    assert "the previous policy stays in force" in caplog.text
    path.write_text("[" * 100_000)  # json.loads: RecursionError (a SettingError since from_file names it)
    with caplog.at_level(logging.ERROR):
        assert not holder.reload()
    path.write_text(json.dumps({"rules": [], "overrides": ["red-team"]}))
    assert not holder.reload()
    assert rule_for(holder.policy, "a pear") == "new"


def test_streamed_answer_checked_in_a_bounded_window(policy: PromptPolicy) -> None:
    """Each delta is checked with at most ANSWER_WINDOW characters before it: a term that straddles deltas is
    found, the window stays bounded however long the answer, and its cut never makes a word's tail a whole word."""
    scan = AnswerScan()
    windows = [scan.window(f"word{i} ") for i in range(2000)]
    assert max(map(len, windows)) <= ANSWER_WINDOW + len("word1999 ")
    assert rule_for(policy, scan.window("a pi")) is None
    assert rule_for(policy, scan.window("pe\u200b bo")) is None
    assert rule_for(policy, scan.window("mb!")) == "weapons"
    cut = AnswerScan()
    cut.window("spipe" + " " * (ANSWER_WINDOW - 4))  # the last ANSWER_WINDOW characters start inside "spipe"
    assert rule_for(policy, cut.window("bomb")) is None
    hidden = AnswerScan()
    hidden.window("s\u200bpipe" + " " * (ANSWER_WINDOW - 4))  # an invisible character is no place to cut
    assert rule_for(policy, hidden.window("bomb")) is None


class _Recording(PromptPolicy):
    """Records the thread each request check runs on."""

    threads: ClassVar[list[threading.Thread]] = []

    def check(self, texts: Iterable[tuple[str, str]], token: str | None) -> Violation | None:
        self.threads.append(threading.current_thread())
        return super().check(texts, token)


def test_requests_are_checked_off_the_event_loop(tmp_path: Path) -> None:
    """A front end in process, no Triton: both refusals come before one is needed. The check of a long prompt at many
    regular expressions takes a while; on the loop, health checks and every other call waited for it."""
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(POLICY))
    unused = f"127.0.0.1:{free_port()}"

    async def run() -> threading.Thread:
        frontend = Frontend(FrontendConfig(listen="127.0.0.1:0", triton_url=unused, metrics_port=0, policy=str(path)))
        assert frontend.policy is not None
        frontend.policy.policy = _Recording(frontend.policy.policy.rules, frontend.policy.policy.overrides)
        port = await frontend.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.OmniGen2Stub(channel)
                question = pb.ChatMessage(role=pb.ROLE_USER, content=[pb.ContentPart(text="a pipe bomb")])
                calls = [
                    stub.Generate(pb.GenerateRequest(prompt="a pipe bomb"), timeout=30),
                    stub.Understand(pb.UnderstandRequest(messages=[question]), timeout=30).read(),
                ]
                for call in calls:
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await call
                    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        finally:
            await frontend.stop()
        counted = frontend.metrics.registry.get_sample_value
        for method in ("Generate", "Understand"):
            assert counted("omnigen2_requests_total", {"method": method, "code": "PERMISSION_DENIED"}) == 1
        return threading.current_thread()

    _Recording.threads.clear()
    loop_thread = asyncio.run(run())
    assert len(_Recording.threads) == 2
    assert loop_thread not in _Recording.threads


def test_answers_are_checked_off_the_event_loop(tmp_path: Path) -> None:
    """A front end in process whose backend streams answers itself (no Triton). Each delta's check, in its window,
    and the whole answer's run on the policy's threads; a delta that completes a match is still not sent. A window of
    letter pairs and zero-width spaces at 100 regex rules took 0.1 s to check, once per delta, on the loop."""
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(POLICY))
    unused = f"127.0.0.1:{free_port()}"
    answers = {
        "clean": ["The lake ", "is quiet", "."],
        "broken": ["a pi", "pe\u200b bo", "mb", " and more"],  # the third delta completes "pipe bomb"
    }

    async def run() -> tuple[threading.Thread, dict[str, list[pb.UnderstandEvent]], grpc.aio.AioRpcError]:
        frontend = Frontend(FrontendConfig(listen="127.0.0.1:0", triton_url=unused, metrics_port=0, policy=str(path)))
        assert frontend.policy is not None
        frontend.policy.policy = _Recording(frontend.policy.policy.rules, frontend.policy.policy.overrides)

        scripts = iter(answers.values())  # one call after the other

        async def answer(*args: object) -> AsyncIterator[dict[str, Any]]:
            deltas = next(scripts)
            for delta in deltas:
                yield {"type": "delta", "text": delta}
            done = {"text": "".join(deltas), "finish_reason": "stop", "token_ids": []}
            yield {"type": "result", "prompt_tokens": 3, "completion_tokens": len(deltas), **done}

        frontend.backend.understand = answer  # type: ignore[method-assign,assignment]
        port = await frontend.start()
        events: dict[str, list[pb.UnderstandEvent]] = {name: [] for name in answers}
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.OmniGen2Stub(channel)
                for name in answers:
                    question = pb.ChatMessage(role=pb.ROLE_USER, content=[pb.ContentPart(text=name)])
                    try:
                        async for event in stub.Understand(pb.UnderstandRequest(messages=[question]), timeout=30):
                            events[name].append(event)
                    except grpc.aio.AioRpcError as error:
                        refused = error
        finally:
            await frontend.stop()
        blocked = frontend.metrics.registry.get_sample_value
        assert blocked("omnigen2_policy_blocked_total", {"rule": "weapons", "stage": "answer"}) == 1
        return threading.current_thread(), events, refused

    _Recording.threads.clear()
    loop_thread, events, refused = asyncio.run(run())
    assert [event.delta for event in events["clean"][:-1]] == answers["clean"]
    assert events["clean"][-1].result.text == "".join(answers["clean"])
    assert [event.delta for event in events["broken"]] == answers["broken"][:2]  # nothing from the matching delta on
    assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
    # Two requests, the clean answer's 3 deltas and whole text, the broken one's deltas up to the match.
    assert len(_Recording.threads) == 2 + 4 + 3
    assert loop_thread not in _Recording.threads
    # On the policy's own threads: on the workers, tokens waited behind large results' PNG encodes.
    assert all(thread.name.startswith("frontend-policy") for thread in _Recording.threads)

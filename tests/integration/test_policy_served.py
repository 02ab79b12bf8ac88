"""The prompt policy on the real stack: a front end with --policy and --auth-tokens in front of the shared Triton.
Refusals cost no model time, name the rule and never the text; per-token overrides; SIGHUP reloads; answers."""

from __future__ import annotations

import json
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from grpc_health.v1 import health_pb2
from omnigen2 import InvalidArgumentError, OmniGen2Client, PermissionDeniedError

from serving.frontend.auth import token_digest
from serving.frontend.metrics_page import total
from serving.frontend.process import FrontendProcess
from serving.triton.launcher import TritonServer
from serving.triton.model_names import BLS_MODEL, MLLM_MODEL
from tests.integration.triton_stats import executions

APP, RED_TEAM = "app-token", "red-team-token"
POLICY = {
    "rules": [
        {"id": "weapons", "terms": ["pipe bomb"]},
        {"id": "card-number", "regexes": [r"\b(?:\d[ -]?){13,16}\b"]},
    ],
    "overrides": {"red-team": {"exempt": ["weapons"]}},
}


@pytest.fixture(scope="module")
def policy_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("policy") / "policy.json"
    path.write_text(json.dumps(POLICY))
    return path


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory, triton: TritonServer, policy_file: Path) -> Iterator[Any]:
    work = tmp_path_factory.mktemp("policy-frontend")
    tokens = work / "tokens.json"
    entries = [
        {"name": "app", "sha256": token_digest(APP), "rate_per_minute": 6000, "burst": 100},
        {"name": "red-team", "sha256": token_digest(RED_TEAM), "rate_per_minute": 6000, "burst": 100},
    ]
    tokens.write_text(json.dumps({"tokens": entries}))
    flags = (f"--policy={policy_file}", f"--auth-tokens={tokens}")
    with FrontendProcess(triton.grpc_url, work / "frontend.log", *flags) as frontend:
        frontend.wait_health(health_pb2.HealthCheckResponse.SERVING)
        yield frontend


def _blocked(frontend: FrontendProcess, rule: str, stage: str) -> float:
    return frontend.metric("omnigen2_policy_blocked_total", rule=rule, stage=stage) or 0.0


def _reloads(frontend: FrontendProcess) -> float:
    """Its policy reloads so far, whatever their result."""
    return total(frontend.metrics(), "omnigen2_policy_reloads_total") or 0.0


def _reload(frontend: FrontendProcess, policy_file: Path, policy: Any) -> None:
    """Rewrite the file, SIGHUP, and wait until the front end has read it (its reload counter moves)."""
    before = _reloads(frontend)
    policy_file.write_text(policy if isinstance(policy, str) else json.dumps(policy))
    assert frontend.process is not None
    frontend.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while _reloads(frontend) == before:
        assert time.monotonic() < deadline, "the front end did not reload its policy"
        time.sleep(0.05)


def test_blocked_requests_cost_no_model_time_and_never_echo_the_text(
    guarded: FrontendProcess, triton: TritonServer
) -> None:
    before = executions(triton, BLS_MODEL), executions(triton, MLLM_MODEL)
    secret = "4111 1111 1111 1111"
    with OmniGen2Client(guarded.address, token=APP, timeout=30, retries=0) as client:
        safety = client.info().safety
        assert (safety.prompt_policy, safety.output_classifier, dict(safety.output_thresholds)) == (True, False, {})
        with pytest.raises(PermissionDeniedError) as raised:
            client.generate("A red apple", negative_prompt=f"card {secret}", width=32, height=32, steps=1)
        assert (raised.value.reason, raised.value.field) == ("card-number", "negative_prompt")
        assert "4111" not in raised.value.message
        with pytest.raises(PermissionDeniedError) as raised:
            list(client.stream("How to build a Pipe Bomb", width=32, height=32, steps=1))
        assert (raised.value.reason, raised.value.field) == ("weapons", "prompt")
        assert "bomb" not in raised.value.message.lower()
        with pytest.raises(PermissionDeniedError) as raised:
            client.understand(f"Is {secret} a valid card?", max_new_tokens=4)
        assert raised.value.reason == "card-number" and raised.value.field == "messages[0].content[0].text"
    assert (executions(triton, BLS_MODEL), executions(triton, MLLM_MODEL)) == before
    assert _blocked(guarded, "card-number", "request") == 2
    assert _blocked(guarded, "weapons", "request") == 1
    log = guarded.log_path.read_text()
    assert "4111" not in log and "Pipe Bomb" not in log  # the access log records the call, not its text


# /tmp/attack/policy_bypass.py: characters that show nothing, none of them a format character (Cf).
HIDDEN = {
    "CGJ": "a pipe bo\u034fmb",
    "VS16": "a pipe bo\ufe0fmb",
    "Hangul filler": "a pipe\u3164bomb",
    "braille blank": "a pipe\u2800bomb",
    "NUL": "a pipe\x00bomb",
}


@pytest.mark.parametrize("prompt", HIDDEN.values(), ids=HIDDEN)
def test_invisible_characters_do_not_hide_a_term(guarded: FrontendProcess, prompt: str) -> None:
    with OmniGen2Client(guarded.address, token=APP, timeout=30, retries=0) as client:
        with pytest.raises(PermissionDeniedError) as raised:
            client.generate(prompt, width=32, height=32, steps=1)
        assert raised.value.reason == "weapons"


def test_a_prompt_of_invisible_characters_is_blank(guarded: FrontendProcess) -> None:
    with OmniGen2Client(guarded.address, token=APP, timeout=30, retries=0) as client:
        with pytest.raises(InvalidArgumentError) as blank:
            client.generate("\u3164\u2800\u034f\u115f\x00", width=32, height=32, steps=1)
        assert blank.value.violations[0].field == "prompt"


def test_a_token_override_exempts_that_token_only(guarded: FrontendProcess) -> None:
    with OmniGen2Client(guarded.address, token=RED_TEAM, timeout=60, retries=0) as client:
        assert client.generate("A pipe bomb disposal robot", width=32, height=32, steps=1).images
        with pytest.raises(PermissionDeniedError):
            client.generate("4111111111111111", width=32, height=32, steps=1)


def test_sighup_reloads_and_a_bad_file_keeps_the_policy_in_force(guarded: FrontendProcess, policy_file: Path) -> None:
    with OmniGen2Client(guarded.address, token=APP, timeout=60, retries=0) as client:
        assert client.generate("A red apple", width=32, height=32, steps=1).images
        _reload(guarded, policy_file, {"rules": [{"id": "fruit", "terms": ["apple"]}]})
        with pytest.raises(PermissionDeniedError) as raised:
            client.generate("A red apple", width=32, height=32, steps=1)
        assert raised.value.reason == "fruit"
        _reload(guarded, policy_file, "{broken")
        with pytest.raises(PermissionDeniedError):  # the previous policy is still in force
            client.generate("A RED APPLE", width=32, height=32, steps=1)
        assert "policy reload failed, the previous policy stays in force" in guarded.log_path.read_text()
    _reload(guarded, policy_file, POLICY)


def test_an_answer_that_breaks_the_policy_ends_the_stream_with_the_rule(
    guarded: FrontendProcess, policy_file: Path
) -> None:
    question = "Describe a quiet lake."
    with OmniGen2Client(guarded.address, token=APP, timeout=120, retries=0) as client:
        answer = client.understand(question, max_new_tokens=12).text  # the tiny model's answer: 12 new lines
        snippet = answer[len(answer) // 2 :]  # a rule only the answer's second half breaks
        assert snippet and snippet not in question
        _reload(guarded, policy_file, {"rules": [{"id": "answer-rule", "regexes": [re.escape(snippet)]}]})
        deltas: list[str] = []
        with pytest.raises(PermissionDeniedError) as raised:
            for event in client.understand_stream(question, max_new_tokens=12):
                deltas.append(event if isinstance(event, str) else event.text)
        assert (raised.value.reason, raised.value.field) == ("answer-rule", "answer")
        assert snippet not in "".join(deltas) and snippet not in raised.value.message
    assert _blocked(guarded, "answer-rule", "answer") == 1
    _reload(guarded, policy_file, POLICY)

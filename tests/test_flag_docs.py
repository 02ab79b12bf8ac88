"""Every flag of `python -m serving.stack` and of the front end has a one-line help that shows its default, is
named by the stack's parser when mistyped, and is in docs/api.md's tables, so that they cannot drift apart again."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import pytest

from serving import stack
from serving.frontend.config import FrontendConfig

API_DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def _flags(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [action for action in parser._actions if action.option_strings and action.dest != "help"]


@pytest.mark.parametrize("parser", [stack.build_parser(), FrontendConfig.parser()], ids=["stack", "frontend"])
def test_every_flag_is_in_the_api_doc(parser: argparse.ArgumentParser) -> None:
    doc = API_DOC.read_text()
    missing = [action.option_strings[0] for action in _flags(parser) if f"`{action.option_strings[0]}`" not in doc]
    assert missing == []


@pytest.mark.parametrize(
    ("parser", "shown"),
    [
        (stack.build_parser, ["--backend", "(default: onnxruntime)", "--precision", "(default: bf16)"]),
        (FrontendConfig.parser, ["--listen", "(default: 127.0.0.1:50051)", "--max-in-flight", "(default: 16)"]),
    ],
    ids=["stack", "frontend"],
)
def test_every_flag_says_what_it_does_and_its_default(
    parser: Callable[[], argparse.ArgumentParser], shown: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "1000")
    built = parser()
    for action in _flags(built):
        assert action.help and not action.help.startswith("env "), action.option_strings
    # One entry per flag ("  --flag METAVAR  help"), its lines joined.
    entries = {" ".join(entry.split()) for entry in built.format_help().split("\n  -")[1:]}
    for flag, default in zip(shown[::2], shown[1::2], strict=True):
        assert any(entry.startswith(flag[1:] + " ") and entry.endswith(default) for entry in entries), flag


def test_a_mistyped_stack_flag_is_named_by_the_stacks_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        stack.main(["--lisen", "127.0.0.1:6000", "--max-in-flight", "4"])  # refused before anything is built
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert "python -m serving.stack: error: unrecognized arguments: --lisen 127.0.0.1:6000" in error
    assert "serving.frontend.server" not in error.splitlines()[0]  # the stack's usage, not the front end's

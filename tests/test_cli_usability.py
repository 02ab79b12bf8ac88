"""What the CLI tells its user, with the SDK's calls stood in for in-process (no server): exit statuses (2 usage,
1 the call failed, 130 Ctrl-C; before, -o out.gif exited 1), no server at the address (before, gRPC's words alone),
an invalid input image named by its file (before, `input_images[0].data`), the default output never written over
(before, omnigen2.png was, silently), and understand's Ctrl-C and footer."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from omnigen2 import FieldViolation, GenerationResult, InvalidArgumentError, OmniGen2Client, UnderstandResult
from omnigen2.cli import main
from omnigen2.v1 import omnigen2_pb2 as pb

from tests.frontends import fake_server
from tests.test_sdk_calls import Recorder
from tests.test_sdk_token_route import REMOTE, Authorization

NOWHERE = ["--server", "127.0.0.1:1", "--retries", "0"]  # no server listens on port 1


def _result(data: bytes) -> GenerationResult:
    return GenerationResult(images=[], seed=7, timings={}, encoded=[data], served_by="stand-in")


@pytest.mark.parametrize("output", ["out.gif", "noext"])
def test_an_output_format_not_offered_is_a_usage_error(output: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*NOWHERE, "generate", "A red apple", "-o", output])
    assert exited.value.code == 2
    assert f"-o/--output: '{output}' must end in one of .png, .jpg, .jpeg, .webp" in capsys.readouterr().err


def test_no_server_exits_1_naming_the_address_and_what_to_do(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*NOWHERE, "info"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("omnigen2: UNAVAILABLE: no OmniGen2 server answered at 127.0.0.1:1 (failed to connect")
    assert "start one with `make serve`" in err
    assert err.endswith("omnigen2: give the address with --server host:port or in OMNIGEN2_SERVER\n")


def test_tls_to_a_plaintext_server_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    """Before: "no OmniGen2 server answered ... start one with `make serve`", and to give the address."""
    with fake_server(Recorder()) as address:
        assert main(["--server", address, "--retries", "0", "--tls", "info"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"omnigen2: UNAVAILABLE: the server at {address} answered without TLS (")
    assert "call it without --tls/--tls-ca" in err and "make serve" not in err and "--server host:port" not in err


def test_a_url_for_server_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--server", "http://127.0.0.1:50051", "info"]) == 2
    assert capsys.readouterr().err.startswith(
        "omnigen2: server: 'http://127.0.0.1:50051' is a URL, not host:port: give e.g. 127.0.0.1:50051 "
    )


def test_ctrl_c_exits_130(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def interrupted(*args: Any, **kwargs: Any) -> Iterator[Any]:
        raise KeyboardInterrupt
        yield

    monkeypatch.setattr(OmniGen2Client, "stream", interrupted)
    assert main([*NOWHERE, "generate", "A red apple", "-o", str(tmp_path / "a.png")]) == 130


def test_an_invalid_input_image_is_named_by_its_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The server's violations name the request's fields; the user gave files and flags."""
    violations = [
        FieldViolation("input_images[1].data", "not a decodable image"),
        FieldViolation("steps", "1..100, got 0"),
        FieldViolation("prompt", "empty"),
    ]

    def refused(*args: Any, **kwargs: Any) -> Iterator[Any]:
        raise InvalidArgumentError(grpc.StatusCode.INVALID_ARGUMENT, "invalid", violations)
        yield

    monkeypatch.setattr(OmniGen2Client, "stream", refused)
    monkeypatch.setattr(OmniGen2Client, "understand_stream", refused)
    compose = ["compose", "cat.png", "notimage.png", "--prompt", "x", "--steps", "0", "-o", str(tmp_path / "o.png")]
    assert main([*NOWHERE, *compose]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "omnigen2: invalid image notimage.png: not a decodable image",
        "omnigen2: invalid --steps: 1..100, got 0",
        "omnigen2: invalid prompt: empty",
    ]
    violations[:] = [FieldViolation("messages[0].content[0].image.data", "not a decodable image")]
    assert main([*NOWHERE, "understand", "notimage.png", "What?"]) == 2
    assert capsys.readouterr().err == "omnigen2: invalid image notimage.png: not a decodable image\n"


def test_the_default_output_is_never_written_over(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """omnigen2.png, then omnigen2-1.png, ...: each run's image kept, and its file said. An -o file is written over,
    as named."""
    images = iter([b"first", b"second", b"third", b"fourth"])
    monkeypatch.setattr(OmniGen2Client, "stream", lambda *args, **kwargs: iter([_result(next(images))]))
    monkeypatch.chdir(tmp_path)
    for _ in range(3):
        assert main([*NOWHERE, "generate", "A red apple", "--quiet"]) == 0
    assert [(tmp_path / name).read_bytes() for name in ("omnigen2.png", "omnigen2-1.png", "omnigen2-2.png")] == [
        b"first",
        b"second",
        b"third",
    ]
    assert [line.split(" (")[0] for line in capsys.readouterr().out.splitlines()] == [
        "wrote omnigen2.png",
        "wrote omnigen2-1.png",
        "wrote omnigen2-2.png",
    ]
    assert main([*NOWHERE, "generate", "A red apple", "--quiet", "-o", "omnigen2.png"]) == 0
    assert (tmp_path / "omnigen2.png").read_bytes() == b"fourth"


def test_a_default_name_taken_during_the_call_is_not_written_over(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Another run in the folder writes the picked name while this one waits for its images: before, this run wrote
    over it. Its images go to the next free name, all of them under one name."""
    monkeypatch.chdir(tmp_path)

    def other_run_writes(taken: str, count: int) -> Any:
        def stream(*args: Any, **kwargs: Any) -> Iterator[GenerationResult]:
            (tmp_path / taken).write_bytes(b"other run")
            yield GenerationResult(images=[], seed=7, timings={}, encoded=[b"mine"] * count, served_by="stand-in")

        return stream

    monkeypatch.setattr(OmniGen2Client, "stream", other_run_writes("omnigen2.png", 1))
    assert main([*NOWHERE, "generate", "A red apple", "--quiet"]) == 0
    assert (tmp_path / "omnigen2.png").read_bytes() == b"other run"
    assert (tmp_path / "omnigen2-1.png").read_bytes() == b"mine"
    monkeypatch.setattr(OmniGen2Client, "stream", other_run_writes("omnigen2-2-1.png", 2))
    assert main([*NOWHERE, "generate", "A red apple", "--quiet", "-n", "2"]) == 0  # picks omnigen2-2.png
    assert (tmp_path / "omnigen2-2-1.png").read_bytes() == b"other run"
    assert not (tmp_path / "omnigen2-2-0.png").exists()  # its own first image moved with the second
    assert [(tmp_path / f"omnigen2-3-{i}.png").read_bytes() for i in range(2)] == [b"mine", b"mine"]
    assert [line.split(" (")[0] for line in capsys.readouterr().out.splitlines()] == [
        "wrote omnigen2-1.png",
        "wrote omnigen2-3-0.png, omnigen2-3-1.png",
    ]


def test_understand_ctrl_c_starts_a_new_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(*args: Any, **kwargs: Any) -> Iterator[str]:
        yield "The apple is"
        raise KeyboardInterrupt

    monkeypatch.setattr(OmniGen2Client, "understand_stream", interrupted)
    assert main([*NOWHERE, "understand", "What colour is the apple?"]) == 130
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("The apple is\n", "omnigen2: cancelled\n")


@pytest.mark.parametrize(
    ("flags", "footer"),
    [
        ([], "(cut off at --max-new-tokens; 12 prompt + 4 answer tokens; 0.50s; served by a)"),
        (["--temperature", "0.005"], "(cut off at --max-new-tokens; 12 prompt + 4 answer tokens; 0.50s; served by a)"),
        (
            ["--temperature", "0.7"],
            "(cut off at --max-new-tokens; 12 prompt + 4 answer tokens; seed 9; 0.50s; served by a)",
        ),
    ],
)
def test_understand_footer_says_why_it_ended_and_the_seed_only_when_sampling(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], flags: list[str], footer: str
) -> None:
    """Greedy decoding (the default, temperature below 0.01) draws nothing from the seed the server returns."""
    result = UnderstandResult("red", "length", 12, 4, 9, [1, 2, 3, 4], 0.5, served_by="a")
    monkeypatch.setattr(OmniGen2Client, "understand_stream", lambda *args, **kwargs: iter(["red", result]))
    assert main([*NOWHERE, "understand", "What colour?", *flags]) == 0
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("red\n", footer + "\n")


@pytest.mark.parametrize("token", [["--token", "secret"], []])
def test_a_token_without_tls_beyond_this_machine_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], token: list[str]
) -> None:
    """Before: the token went in cleartext to the remote server (here: no answer, exit 1 after the timeout)."""
    monkeypatch.setenv("OMNIGEN2_TOKEN", "from-env")
    assert main(["--server", REMOTE, *token, "--retries", "0", "--timeout", "1", "info"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"omnigen2: token: it would go in cleartext to {REMOTE}, readable on the way: ")
    assert "--tls or --tls-ca" in err and "--allow-plaintext-token" in err


def test_allow_plaintext_token_sends_it_anyway(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(OmniGen2Client, "info", lambda self: pb.ModelInfo(model="OmniGen2"))
    assert main(["--server", REMOTE, "--token", "secret", "--allow-plaintext-token", "info"]) == 0
    assert '"model": "OmniGen2"' in capsys.readouterr().out


def test_a_token_goes_in_cleartext_to_loopback(capsys: pytest.CaptureFixture[str]) -> None:
    with fake_server(Authorization()) as address:
        assert main(["--server", address, "--token", "secret", "--retries", "0", "info"]) == 0
    assert '"model": "Bearer secret"' in capsys.readouterr().out

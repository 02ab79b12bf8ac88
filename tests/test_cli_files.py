"""The CLI names a file it cannot read or write instead of printing a traceback (no server needed: the channel
is lazy and the input is read before the first call)."""

from __future__ import annotations

from pathlib import Path

import pytest
from omnigen2.cli import main


def test_a_missing_input_image_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere.png"
    assert main(["--server", "127.0.0.1:1", "edit", str(missing), "Make it green", "-o", str(tmp_path / "o.png")]) == 2
    assert capsys.readouterr().err.startswith(f"omnigen2: [Errno 2] No such file or directory: '{missing}'")


def test_a_missing_tls_root_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "ca.pem"
    assert main(["--tls-ca", str(missing), "info"]) == 2
    assert str(missing) in capsys.readouterr().err


def test_an_output_folder_that_does_not_exist_is_named_before_any_call(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before the call, not after the server has spent its steps: no server listens on port 1."""
    output = tmp_path / "missing" / "apple.png"
    assert main(["--server", "127.0.0.1:1", "generate", "A red apple", "-o", str(output)]) == 2
    assert capsys.readouterr().err.startswith(f"omnigen2: cannot write {output}: {output.parent} is not a folder")


@pytest.mark.parametrize(
    ("flags", "folder"), [([], "apple.png"), (["-n", "2"], "apple-1.png"), (["-n", "3"], "apple.png")]
)
def test_an_output_that_is_a_folder_is_named_before_any_call(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], folder: str
) -> None:
    """Each file the call may write is checked first (with -n 3, apple.png too: one image may be left of three);
    before, only -o's folder was, and the images were lost to "Is a directory" after the work."""
    (tmp_path / folder).mkdir()
    output = tmp_path / "apple.png"
    assert main(["--server", "127.0.0.1:1", "generate", "A red apple", "-o", str(output), *flags]) == 2
    assert capsys.readouterr().err == f"omnigen2: cannot write {tmp_path / folder}: it is a folder\n"

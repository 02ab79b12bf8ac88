"""`make demo` installs the web UI's extra once, not at every start; installs silence only setuptools' editable-install
warning (a folder named like the package), so that real failures still show."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _planned(target: str, venv: Path) -> str:
    """The commands `make -n` would run for `target` with this virtual environment."""
    return subprocess.run(
        ["make", "-n", "--no-print-directory", target, f"VENV={venv}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout


def test_make_demo_installs_the_web_ui_once(tmp_path: Path) -> None:
    (tmp_path / ".installed").touch()  # newer than both pyproject files: the venv is up to date
    first = _planned("demo", tmp_path)
    assert (
        "PYTHONWARNINGS='ignore:Editable installation'" in first and "pip install --quiet -e './client[webui]'" in first
    )
    (tmp_path / ".webui-installed").touch()
    assert "pip install" not in _planned("demo", tmp_path)
    assert "omnigen2.webui" in _planned("demo", tmp_path)

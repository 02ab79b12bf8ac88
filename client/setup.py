"""Generates the gRPC stubs from ../proto before packaging, so wheels and editable installs carry them."""

from __future__ import annotations

import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from build_stubs import generate_stubs  # noqa: E402


class BuildWithStubs(build_py):
    def run(self) -> None:
        generate_stubs(HERE.parent / "proto", HERE)
        super().run()


setup(cmdclass={"build_py": BuildWithStubs})

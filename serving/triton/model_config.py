"""What every Python-backend model reads from the `args` Triton passes to `initialize`."""

from __future__ import annotations

import json
from typing import Any


def model_config(args: dict[str, str]) -> dict[str, Any]:
    config: dict[str, Any] = json.loads(args["model_config"])
    return config


def parameters(config: dict[str, Any]) -> dict[str, str]:
    """The config.pbtxt `parameters` as plain strings (serving/artifacts/model_configs.py builds them, repository.py
    writes them)."""
    return {name: value["string_value"] for name, value in config.get("parameters", {}).items()}

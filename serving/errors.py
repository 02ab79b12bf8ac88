"""Typed errors. Each names what is wrong so that the API layer can map it to a precise status."""

from __future__ import annotations


class OmniGen2Error(Exception):
    """Base class of every error this package raises on purpose."""


class InvalidArgumentError(OmniGen2Error, ValueError):
    """A request field is out of its documented range; `field` names it (maps to INVALID_ARGUMENT)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.description = message


class CheckpointError(OmniGen2Error):
    """A checkpoint on disk is missing a part or does not match the architecture; `path` names the file."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.description = message


class SettingError(OmniGen2Error, ValueError):
    """An operator setting (a flag, a device, a dtype) cannot be honoured here; `setting` names it."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting = setting
        self.description = message


class ComponentDiedError(OmniGen2Error):
    """A component model's process died under a request to it (serving/triton/component_watch.py); maps to
    UNAVAILABLE: the call may be retried once the watchdog has loaded the model again."""

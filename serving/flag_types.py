"""The value types of the serving command lines' flags, for argparse's `type=`: each refuses a bad value with one
line, `<what is wrong> (<the value>)`, which argparse prefixes with the flag's name, and says what it takes
(`bounds`, shown in the flag's help). The same checks run on the OMNIGEN2_* environment variables (`from_env`),
which then name the variable, and on values set in process (`check_value`: a config that tests or the stack build
directly), which name the flag: each bound is declared once, here.

No heavy imports here: the flags are checked before torch, gRPC or Triton load.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from serving.errors import SettingError

T = TypeVar("T")
MAX_PORT = 65_535


@dataclass(frozen=True)
class Whole:
    """A whole number from `low` to `high` (None: no upper bound); `why` says what the bounds come from."""

    low: int
    high: int | None = None
    why: str = ""

    @property
    def bounds(self) -> str:
        shown = f">= {self.low}" if self.high is None else f"{self.low} to {self.high}"
        return shown + (f"; {self.why}" if self.why else "")

    def __call__(self, text: str) -> int:
        try:
            value = int(str(text).strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number ({text})") from None
        return self.check(value, text)

    def check(self, value: object, shown: object = None) -> int:
        """`value` itself, in bounds; `shown`: what the refusal quotes (the text as typed; default: the value)."""
        if not isinstance(value, int) or isinstance(value, bool):
            raise argparse.ArgumentTypeError(f"not a whole number ({value!r})")
        if value < self.low or (self.high is not None and value > self.high):
            raise argparse.ArgumentTypeError(f"must be {self.bounds} ({value if shown is None else shown})")
        return value


@dataclass(frozen=True)
class Number:
    """A finite number from `low` (excluded if `above`) to `high`, or 0 as well if `off` (0 turns the setting off,
    and the least working value is `low`); NaN and infinities are refused."""

    low: float
    high: float | None = None
    above: bool = False
    why: str = ""
    off: bool = False

    @property
    def bounds(self) -> str:
        shown = f"{'0 or ' if self.off else ''}{'>' if self.above else '>='} {_show(self.low)}"
        if self.high is not None:
            shown += f", at most {_show(self.high)}"
        return shown + (f"; {self.why}" if self.why else "")

    def __call__(self, text: str) -> float:
        try:
            value = float(str(text).strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number ({text})") from None
        return self.check(value, text)

    def check(self, value: object, shown: object = None) -> float:
        """`value` itself, in bounds; `shown`: what the refusal quotes (the text as typed; default: the value)."""
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise argparse.ArgumentTypeError(f"not a number ({value!r})")
        shown = value if shown is None else shown
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number ({shown})")
        if self.off and value == 0:
            return value
        if value < self.low or (self.above and value == self.low) or (self.high is not None and value > self.high):
            raise argparse.ArgumentTypeError(f"must be {self.bounds} ({shown})")
        return value


@dataclass(frozen=True)
class Address:
    """HOST:PORT or [V6]:PORT, port 0 to 65535 (0: any free port); `optional`: '' (off) is taken too."""

    optional: bool = False

    @property
    def bounds(self) -> str:
        return "HOST:PORT, port 0 to 65535" + (" or ''" if self.optional else "")

    def __call__(self, text: str) -> str:
        return self.check(text)

    def check(self, text: object) -> str:
        """`text` itself, a well-formed address."""
        if not isinstance(text, str):
            raise argparse.ArgumentTypeError(f"not HOST:PORT ({text!r})")
        if self.optional and text == "":
            return text
        host, colon, port = text.rpartition(":")
        if not colon or not host:
            raise argparse.ArgumentTypeError(f"not HOST:PORT ({text})")
        if not port.isdigit() or int(port) > MAX_PORT:
            raise argparse.ArgumentTypeError(f"the port must be a whole number from 0 to {MAX_PORT} ({text})")
        return text


# A web origin as browsers send it (RFC 6454): scheme://host[:port], no path, no trailing slash.
_ORIGIN = re.compile(r"https?://(\[[0-9a-f:.]+\]|[a-z0-9.-]+)(:[0-9]{1,5})?")


@dataclass(frozen=True)
class Origins:
    """Comma-separated web origins (https://app.example, http://localhost:3000), or '' (none)."""

    @property
    def bounds(self) -> str:
        return "scheme://host[:port], comma-separated, or ''"

    def __call__(self, text: str) -> str:
        return self.check(text)

    def check(self, text: object) -> str:
        """`text` itself, each of its origins well-formed."""
        if not isinstance(text, str):
            raise argparse.ArgumentTypeError(f"not comma-separated origins ({text!r})")
        for origin in sorted(origin_set(text)):
            if not _ORIGIN.fullmatch(origin):
                raise argparse.ArgumentTypeError(f"not an origin like https://app.example ({origin})")
        return text


def origin_set(text: str) -> frozenset[str]:
    """The origins of an Origins flag, lowercase as browsers send them."""
    return frozenset(o.strip().lower() for o in text.split(",") if o.strip())


def from_env(env: str, parse: Callable[[str], T], default: T) -> T:
    """The environment variable's value through the flag's own check (the default if unset), naming the variable."""
    if env not in os.environ:
        return default
    try:
        return parse(os.environ[env])
    except argparse.ArgumentTypeError as exc:
        raise SettingError(env, str(exc)) from None


def check_value(setting: str, kind: Whole | Number | Address | Origins, value: object) -> None:
    """A value set in process, not parsed from text, refused as its flag's text would be, in one line naming
    `setting` (the flag)."""
    try:
        kind.check(value)
    except argparse.ArgumentTypeError as exc:
        raise SettingError(setting, str(exc)) from None


def _show(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else str(bound)

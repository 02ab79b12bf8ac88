"""The help formatter of the serving command lines: every flag's default after its one-line help."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written (module docstrings), and "(default: X)" after each flag's help, unless the help
    names its default itself or there is none to show (None: worked out from other flags; '': off, which the help
    says)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default in (None, "", argparse.SUPPRESS) or not action.option_strings:
            return text
        return super()._get_help_string(action)

"""Checks the command-line tools share, so that a bad argument stops a tool before its work."""
from __future__ import annotations

import argparse
import os


def check_output_file(parser: argparse.ArgumentParser, option: str, path: str | None):
    """Exits through `parser` with a one-line error when `path` (the value of `option`) cannot be
    written as a file: it is a folder, or its folder does not exist. None passes (not given)."""
    if path is None:
        return
    if os.path.isdir(path):
        parser.error(f"{option} {path!r} is a folder; give the path of a file to write")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        parser.error(f"{option} {path!r}: the folder {folder!r} does not exist")


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except the empty ones (None, [], False), whose help says what
    leaving the option out means."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)

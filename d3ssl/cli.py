"""Checks the command-line tools share, so that a bad argument stops a tool before its work."""
from __future__ import annotations

import argparse
import difflib
import math
import os
import re
import sys


class ArgumentParser(argparse.ArgumentParser):
    """The tools' parser: whole option names only (argparse would take a prefix, so that a typo
    such as ``--data.batch 4`` set --data.batch_size), and a suggestion for an unknown option."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        unknown = re.match(r"unrecognized arguments: (.*)", message)
        if unknown:
            options = [o for action in self._actions for o in action.option_strings if o.startswith("--")]
            hints = []
            for arg in unknown.group(1).split():
                name = arg.split("=", 1)[0]
                if not name.startswith("--"):
                    continue
                # (an option that the typo begins, as argparse's prefixes had it, else the closest)
                close = [o for o in options if o.startswith(name)][:3] or difflib.get_close_matches(
                    name, options, n=3, cutoff=0.7)
                if close:
                    hints.append(f"{name}: did you mean {' or '.join(close)}?")
            if hints:
                message += " (" + "; ".join(hints) + ")"
        usage = self.format_usage()
        if usage.count("\n") > 4:  # (train.run's lists ~200 options: the error would scroll away)
            usage = f"usage: {self.prog} [options]   (`{self.prog} --help` explains every option)\n"
        self._print_message(usage, sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def torch_load_problem(path: str, error: Exception) -> str:
    """Why torch.load(path, weights_only=True) failed, in words for the user: a file that is no
    PyTorch file at all, or a damaged or foreign one (without torch's advice to load it with
    weights_only=False, which would run whatever code the file holds)."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError as e:
        return f"cannot read it ({e.strerror or e})"
    if head not in (b"PK", b"\x80\x02"):   # torch.save's zip archive, or its older pickle format
        return "not a PyTorch checkpoint"
    text = str(error).strip()
    if "Weights only load failed" in text:
        return "a PyTorch file with objects other than tensors and plain containers: not a checkpoint of this project"
    return f"a damaged PyTorch file ({type(error).__name__}: {text.splitlines()[0][:200] if text else ''})"


def output_file_problem(option: str, path: str) -> str | None:
    """Why `path` (the value of `option`) cannot be written as a file, as a one-line error (it is a
    folder, or its folder does not exist), or None."""
    if os.path.isdir(path):
        return f"{option} {path!r} is a folder; give the path of a file to write"
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        blocker = file_in_the_way(folder)
        return (f"{option} {path!r}: {blocker!r} is a file, not a folder" if blocker else
                f"{option} {path!r}: the folder {folder!r} does not exist")
    return None


def file_in_the_way(folder: str) -> str | None:
    """The file (not a folder) that stands where `folder` or one of the folders above it should be,
    or None."""
    folder = os.path.abspath(folder)
    while not os.path.exists(folder):
        parent = os.path.dirname(folder)
        if parent == folder:
            return None
        folder = parent
    return None if os.path.isdir(folder) else folder


def check_output_file(parser: argparse.ArgumentParser, option: str, path: str | None):
    """Exits through `parser` with :func:`output_file_problem`'s error, if any. None passes (not given)."""
    problem = None if path is None else output_file_problem(option, path)
    if problem:
        parser.error(problem)


def check_image_size(parser: argparse.ArgumentParser, option: str, size: int):
    """The evaluation tools' image side: at least one cell of the C5 map (stride 32)."""
    if size < 32:
        parser.error(f"{option} must be >= 32 (the C5 map has stride 32), got {size}")


def check_device(parser: argparse.ArgumentParser, option: str, text: str | None) -> str:
    """`text`, or cuda when a GPU is visible else cpu when None; exits through `parser` unless it is
    cpu, or cuda[:N] with a visible GPU."""
    import re

    import torch
    if text is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text) or (text.startswith("cuda") and not torch.cuda.is_available()):
        parser.error(f"{option} {text}: use cpu, or cuda[:N] on a machine with a visible GPU")
    return text


def number(value: float, spec: str = ".2f") -> str:
    """`value` formatted with `spec`, or "not finite" for NaN and infinities (a diverged network's
    measures), so that no result reads as the number "nan"."""
    return format(value, spec) if math.isfinite(value) else "not finite"


def finite_or_none(obj):
    """`obj` (dicts, lists and tuples of plain values) with every NaN or infinite float replaced by
    None, which JSON writes as null: strict JSON readers refuse the NaN that Python would write."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


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

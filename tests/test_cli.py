"""The checks the command-line tools share (d3ssl.cli): bad arguments stop a tool before its work."""
import argparse

import pytest

from d3ssl.cli import check_output_file, positive_int


def test_output_file_must_be_writable_as_a_file(tmp_path, capsys):
    p = argparse.ArgumentParser(prog="tool")
    check_output_file(p, "--out", None)
    check_output_file(p, "--out", str(tmp_path / "new.png"))        # a new file in a folder that exists
    for path, message in ((str(tmp_path), "is a folder"), (str(tmp_path / "no" / "x.png"), "does not exist")):
        with pytest.raises(SystemExit) as stop:
            check_output_file(p, "--out", path)
        assert stop.value.code == 2 and message in capsys.readouterr().err


def test_positive_int():
    assert positive_int("3") == 3
    for text, message in (("0", "must be >= 1"), ("-2", "must be >= 1"), ("x", "expected an integer")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            positive_int(text)

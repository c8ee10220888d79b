"""The checks the command-line tools share (d3ssl.cli): bad arguments stop a tool before its work."""
import argparse

import pytest

from d3ssl.cli import check_output_file, positive_int


def test_output_file_must_be_writable_as_a_file(tmp_path, capsys):
    p = argparse.ArgumentParser(prog="tool")
    check_output_file(p, "--out", None)
    check_output_file(p, "--out", str(tmp_path / "new.png"))        # a new file in a folder that exists
    (tmp_path / "file").write_text("not a folder")
    for path, message in ((str(tmp_path), "is a folder"), (str(tmp_path / "no" / "x.png"), "does not exist"),
                          (str(tmp_path / "file" / "x.png"), f"{str(tmp_path / 'file')!r} is a file, not a folder"),
                          (str(tmp_path / "file" / "a" / "x.png"), "is a file, not a folder")):
        with pytest.raises(SystemExit) as stop:
            check_output_file(p, "--out", path)
        assert stop.value.code == 2 and message in capsys.readouterr().err


def test_positive_int():
    assert positive_int("3") == 3
    for text, message in (("0", "must be >= 1"), ("-2", "must be >= 1"), ("x", "expected an integer")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            positive_int(text)


@pytest.mark.parametrize("tool", ["train.run", "d3ssl.eval.oknn", "d3ssl.eval.report", "d3ssl.eval.compare",
                                  "d3ssl.eval.export", "d3ssl.augment.show", "d3ssl.data.proposals"])
def test_the_tools_take_whole_option_names_and_suggest_for_a_typo(tool, capsys):
    """argparse takes a unique prefix of an option by default: a typo that is a prefix (as
    --data.batch of --data.batch_size) would set the longer option. The tools refuse it, and
    name the option meant."""
    import importlib
    main = importlib.import_module(tool).main
    typo, meant, required = {
        "train.run": ("--data.batch", "--data.batch_size", []),
        "d3ssl.eval.oknn": ("--temperatur", "--temperature", ["--random-init", "--data", "d"]),
        "d3ssl.eval.report": ("--pair", "--pairs", ["--data", "d", "--out", "o"]),
        "d3ssl.eval.compare": ("--method", "--methods", ["--out", "o"]),
        "d3ssl.eval.export": ("--forma", "--format", ["--ckpt", "c", "--format", "torchvision", "--out", "o"]),
        "d3ssl.augment.show": ("--siz", "--size", ["image.png"]),
        "d3ssl.data.proposals": ("--worker", "--workers", ["--images", "d"])}[tool]
    with pytest.raises(SystemExit) as stop:
        main(required + [typo, "4"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and f"unrecognized arguments: {typo}" in err and f"did you mean {meant}" in err, err
    assert len(err.splitlines()) <= 6, err   # a long usage is shortened, so that the error stays in sight


def test_a_typo_gets_the_closest_options_only(capsys):
    from d3ssl.cli import ArgumentParser
    p = ArgumentParser(prog="tool")
    p.add_argument("--image-size")
    p.add_argument("--batch-size")
    p.add_argument("-v", action="store_true")
    with pytest.raises(SystemExit):
        p.parse_args(["--image-sise", "3", "--zzz", "-w"])
    err = capsys.readouterr().err
    assert "(--image-sise: did you mean --image-size?)" in err and "--zzz:" not in err and "-w:" not in err
    with pytest.raises(SystemExit):
        p.parse_args(["--image", "3"])     # a prefix, refused, and the option it begins named
    assert "unrecognized arguments: --image 3 (--image: did you mean --image-size?)" in capsys.readouterr().err


def test_why_a_checkpoint_does_not_load_is_said_in_words(tmp_path):
    """Not a PyTorch file; a torn one; one with objects weights_only refuses (without torch's advice
    to load it with weights_only=False, which would run the file's code)."""
    import torch

    from d3ssl.cli import torch_load_problem

    def problem(path):
        try:
            torch.load(path, weights_only=True)
        except Exception as e:  # noqa: BLE001
            return torch_load_problem(str(path), e)
        raise AssertionError(f"{path} loaded")
    (tmp_path / "log.jsonl").write_text('{"step": 1}\n')
    assert problem(tmp_path / "log.jsonl") == "not a PyTorch checkpoint"
    torch.save({"model": {"w": torch.ones(3)}}, tmp_path / "good.pt")
    (tmp_path / "torn.pt").write_bytes((tmp_path / "good.pt").read_bytes()[:200])
    assert problem(tmp_path / "torn.pt").startswith("a damaged PyTorch file (")
    torch.save({"model": argparse.Namespace(a=1)}, tmp_path / "foreign.pt")
    text = problem(tmp_path / "foreign.pt")
    assert text.startswith("a PyTorch file with objects other than tensors") and "weights_only=False" not in text

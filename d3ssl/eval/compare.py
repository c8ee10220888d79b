"""The comparison of D3SSL with the SoCo baseline and with D3SSL without L_dp: train each with the
same budget, then report.

    python -m d3ssl.eval.compare --out compare/                       # d3ssl, soco and no_dp
    python -m d3ssl.eval.compare --out compare/ --set run.epochs=10   # any trainer override, for all
    python -m d3ssl.eval.compare --out compare/ --methods d3ssl,soco  # a subset

is the same as the commands

    python -m train.run --preset compare-d3ssl --out compare/runs --name d3ssl
    python -m train.run --preset compare-soco  --out compare/runs --name soco
    python -m train.run --preset compare-no_dp --out compare/runs --name no_dp
    python -m d3ssl.eval.report --ckpt compare/runs/d3ssl --ckpt compare/runs/soco \\
        --ckpt compare/runs/no_dp --data <the synthetic set> --out compare/report --image-size 128 \\
        --label d3ssl --label soco --label no_dp

The runs use the embedded synthetic set (or --data), the same seed, backbone, views, batch and
schedule; only the method differs (no_dp: D3SSL without the de-positioning view x3 and its loss,
the paper's table 7). The report (O-KNN, disturbed O-KNN, CR, MCS for each and for the
random-init network) lands in ``OUT/report``. Runs are started with ``--resume auto``: an interrupted
one continues, a finished one is not trained again.
"""
from __future__ import annotations

import argparse
import glob
import os
import signal
import subprocess
import sys

from d3ssl.cli import ArgumentParser

METHODS = {"d3ssl": "compare-d3ssl", "soco": "compare-soco", "no_dp": "compare-no_dp"}


def parse_methods(text: str) -> list[str]:
    """Comma-separated names of METHODS, in the given order, each once."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(f"--methods: expected distinct names among {', '.join(METHODS)}, got {text!r}")
    return names


def train_command(preset: str, out: str, name: str, overrides: list[str], data: str | None) -> list[str]:
    # --resume auto: an interrupted run continues, a finished one is not trained again
    cmd = [sys.executable, "-m", "train.run", "--preset", preset, "--out", out, "--name", name, "--resume", "auto"]
    if data:
        cmd += ["--data", data]
    for item in overrides:
        cmd += ["--set", item]
    return cmd


def eval_data_root(preset: str, overrides: list[str], data: str | None) -> str:
    """The COCO-format folder the runs trained on (the synthetic set's folder unless --data)."""
    if data:
        return data
    from train.config import make_config
    return make_config(preset, dict(item.split("=", 1) for item in overrides)).data.ensure_synthetic()


def main(argv=None) -> int:
    from d3ssl.cli import check_device, check_image_size, positive_int
    first, _, rest = __doc__.partition("\n\n")
    p = ArgumentParser(prog="python -m d3ssl.eval.compare", description=first,
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=rest)
    p.add_argument("--out", required=True, help="folder for the runs (OUT/runs/<method>) and the report (OUT/report)")
    p.add_argument("--data", default=None, help="COCO-format dataset (default: the embedded synthetic set)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="trainer override applied to every run (repeatable), e.g. run.epochs=10")
    p.add_argument("--image-size", type=positive_int, default=128, help="report: O-KNN image side, px "
                   "(default 128: the synthetic images are 128-160 px)")
    p.add_argument("--pairs", type=positive_int, default=200, help="report: CR object pairs (default 200)")
    p.add_argument("--objects", type=positive_int, default=200, help="report: MCS objects (default 200)")
    p.add_argument("--max-train-images", type=positive_int, default=None,
                   help="report: O-KNN bank from the first train images (default: all)")
    p.add_argument("--device", default=None, help="report device (default: cuda if available)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated runs to train and report, "
                   f"among {', '.join(METHODS)} (default: all of them)")
    p.add_argument("--skip-train", action="store_true", help="only run the report on existing runs")
    a = p.parse_args(argv)
    check_image_size(p, "--image-size", a.image_size)
    if a.max_train_images == 1:
        p.error("--max-train-images must be at least 2: the report's disturbed O-KNN takes each image's "
                "background from another image of its split")
    try:
        methods = parse_methods(a.methods)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    for item in a.set:
        if "=" not in item:
            raise SystemExit(f"error: --set expects NAME=VALUE, got {item!r}")
    if a.device:
        check_device(p, "--device", a.device)
    if a.data:  # the report needs both splits' ground truth: known now, not after three trainings
        from .oknn import check_splits
        try:
            check_splits(a.data, "train", "val")
        except (FileNotFoundError, ValueError) as e:
            p.error(f"--data: {e}")
    runs = os.path.join(a.out, "runs")
    if a.skip_train:
        missing = [name for name in methods if not glob.glob(os.path.join(runs, name, "checkpoints", "*.pt"))]
        if missing:
            raise SystemExit(f"error: --skip-train: no trained run for {', '.join(missing)} in {runs} "
                             "(a run folder with checkpoints/); leave out --skip-train to train them")
    for name in methods:
        if a.skip_train:
            continue
        cmd = train_command(METHODS[name], runs, name, a.set, a.data)
        print("+ " + " ".join(cmd), flush=True)
        # A Ctrl-C reaches the training too, which finishes its step, saves and ends: wait for it
        # (subprocess.call would kill it at once on the KeyboardInterrupt)
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            rc = subprocess.call(cmd)
        finally:
            signal.signal(signal.SIGINT, previous)
        if rc in (128 + signal.SIGINT, 128 + signal.SIGTERM):
            print(f"interrupted while training {name}: it saved its step; the same command goes on from it",
                  file=sys.stderr)
            return rc
        if rc != 0:
            raise SystemExit(f"error: training {name} failed (exit status {rc})")
    data = eval_data_root(METHODS["d3ssl"], a.set, a.data)
    from .report import main as report
    argv = ["--data", data, "--out", os.path.join(a.out, "report"), "--image-size", str(a.image_size),
            "--pairs", str(a.pairs), "--objects", str(a.objects)]
    for name in methods:
        argv += ["--ckpt", os.path.join(runs, name), "--label", name]
    if a.max_train_images:
        argv += ["--max-train-images", str(a.max_train_images)]
    if a.device:
        argv += ["--device", a.device]
    print("+ python -m d3ssl.eval.report " + " ".join(argv), flush=True)
    report(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())

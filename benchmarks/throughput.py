"""Images per second of every stage of d3ssl, each against its anchor measured in the same run.

  python benchmarks/throughput.py --section ops [--device cpu|cuda] [--json FILE]
  python benchmarks/throughput.py --section all

Sections: ops (RoIAlign vs torchvision), region (PRC/PRM erase, composite, region stage vs plain
PyTorch), proposals (selective search), loader (CPU / DALI loaders vs a PIL loader), train (full
step fed by each backend vs data already on the device). Each prints a table of our figure, the
anchor's, their ratio and the target ratio where the project has one.
"""
import argparse
import importlib
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

SECTIONS = ["ops", "region", "proposals", "loader", "train"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--section", default="ops", choices=SECTIONS + ["all"],
                   help="which stage to measure (default: ops)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"],
                   help="where to run (default: cuda when a GPU is visible, else cpu)")
    p.add_argument("--backend", default="both", choices=["cpu", "dali", "both"],
                   help="loader backend(s) for the loader and train sections (default: both available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--quick", action="store_true", help="fewer repeats and smaller inputs (smoke test)")
    p.add_argument("--compile", action="store_true",
                   help="train section: torch.compile the methods' forward, as --compile does for training")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the rows as JSON to FILE")
    args = p.parse_args(argv)
    from d3ssl.cli import check_output_file
    check_output_file(p, "--json", args.json)   # before minutes of measuring
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda was asked for but no GPU is visible to torch")
    return args


def print_table(rows):
    if not rows:
        return
    head = f"{'section':<10} {'measure':<44} {'ours':>12} {'anchor':>12} {'ratio':>7} {'target':>7}  anchor"
    print(head)
    print("-" * len(head))
    for r in rows:
        target = f"{r.target:.2f}" if r.target is not None else "-"
        ok = "" if r.target is None else ("  ok" if r.ratio >= r.target else "  BELOW TARGET")
        print(f"{r.section:<10} {r.name:<44} {r.ours:>12.1f} {r.anchor:>12.1f} {r.ratio:>7.2f} "
              f"{target:>7}  {r.anchor_name} ({r.unit}){ok}")
        for k, v in r.extra.items():
            print(f"{'':<10}   {k}: {v}")


def main(argv=None):
    args = parse_args(argv)
    import d3ssl  # noqa: F401  (fails early with a clear message if the library is not built)

    if args.threads:
        torch.set_num_threads(args.threads)
    sections = SECTIONS if args.section == "all" else [args.section]
    env = {"device": args.device, "threads": torch.get_num_threads(), "torch": torch.__version__,
           "cpu": platform.processor() or platform.machine(),
           "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
           "date": time.strftime("%Y-%m-%d")}
    print(f"d3ssl throughput: {env}")
    rows = []
    for name in sections:
        module = importlib.import_module(f"benchmarks.sections.{name}")
        section_rows = module.run(args)
        print_table(section_rows)
        print()
        rows += section_rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "rows": [r.as_dict() for r in rows]}, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

"""One report of the paper's diagnostics for one or more checkpoints and the random-init network.

    python -m d3ssl.eval.report --ckpt runs/d3ssl --ckpt runs/soco --data DATA_DIR --out report/

For every network: O-KNN and disturbed O-KNN (top-1/top-5, %), the coupling rate (CR) and the mean
cosine similarity of a 3×3 grid (MCS) at conv1 and layer1..4 (mean ± std over object pairs / objects,
with quartiles in results.json). Writes, under --out:

    report.md     Markdown tables (O-KNN, CR per layer, MCS per layer)
    cr.png        CR against depth, one line per network (paper figure 3b), band = quartiles
    mcs.png       MCS against depth (paper figure 4b)
    results.json  every number, with the settings used

The random-init network is the checkpoint's architecture freshly initialised with --seed (one per
architecture present); --no-random leaves it out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from d3ssl.cli import ArgumentParser, finite_or_none, number

from .coupling import coupling_rate
from .disturbed import evaluate_disturbed_oknn
from .oknn import DEFAULT_OBJECTS_PER_IMAGE, SplitsOverlap, _checkpoint_file, check_splits, evaluate_oknn
from .positional import mean_cosine_similarity
from .probe import LAYERS, PROBE_STRIDE, load_objects, summarize

RANDOM = "random-init"


def run_label(path: str) -> str:
    """A short name for a checkpoint: the run folder's name (runs/NAME/checkpoints/step_*.pt → NAME)."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        return os.path.basename(path.rstrip(os.sep))
    parent = os.path.dirname(path)
    if os.path.basename(parent) == "checkpoints":
        return f"{os.path.basename(os.path.dirname(parent))}"
    return os.path.splitext(os.path.basename(path))[0]


def evaluate_network(backbone, data_root: str, objects, settings: dict, device, progress: bool = True) -> dict:
    """All four measures for one backbone. Returns {"oknn", "disturbed_oknn", "cr", "mcs"}."""
    backbone = backbone.to(device)
    oknn_kw = dict(train_split=settings["train_split"], val_split=settings["val_split"],
                   max_objects_per_image=settings["objects_per_image"], k=settings["k"],
                   temperature=settings["temperature"], image_size=settings["image_size"], device=device,
                   batch_size=settings["batch_size"], max_train_images=settings["max_train_images"],
                   max_val_images=settings["max_val_images"], progress=progress)
    steps = tqdm(total=4, desc="measures", disable=not progress, leave=False)
    out = {}
    steps.set_postfix_str("O-KNN")
    out["oknn"] = evaluate_oknn(backbone, data_root, **oknn_kw)
    steps.update()
    steps.set_postfix_str("disturbed O-KNN")
    out["disturbed_oknn"] = evaluate_disturbed_oknn(backbone, data_root, seed=settings["seed"], **oknn_kw)
    steps.update()
    steps.set_postfix_str("CR")
    cr = coupling_rate(backbone, objects, settings["pairs"], settings["cr_image_size"], settings["object_size"],
                       settings["gap"], settings["seed"], settings["batch_size"], device, progress=progress)
    out["cr"] = {name: summarize(v) for name, v in cr.items()}
    steps.update()
    steps.set_postfix_str("MCS")
    mcs = mean_cosine_similarity(backbone, objects, settings["objects"], settings["tile_size"], settings["seed"],
                                 settings["batch_size"], device, progress=progress)
    out["mcs"] = {name: summarize(v) for name, v in mcs.items()}
    steps.update()
    steps.close()
    return out


def _pm(s: dict) -> str:
    return f"{s['mean']:.3f} ± {s['std']:.3f}" if np.isfinite(s["mean"]) else "not finite"


def markdown(results: dict, settings: dict) -> str:
    """report.md: three tables (O-KNN, CR, MCS), one row per network."""
    names = list(results)
    lines = ["# D3SSL diagnostics", "",
             f"Data: `{settings['data']}` (bank: {settings['train_split']}, queries and probe objects: "
             f"{settings['val_split']}). CR over {settings['pairs']} object pairs, MCS over up to "
             f"{settings['objects']} objects; mean ± std (quartiles in results.json).", "",
             "## O-KNN (%)", "",
             "| network | arch | O-KNN top-1 | O-KNN top-5 | disturbed top-1 | disturbed top-5 "
             "| position share |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for n in names:
        r = results[n]
        share = r["oknn"].get("position_share")
        lines.append(f"| {n} | {r['arch']} | {number(r['oknn']['top1'])} | {number(r['oknn']['top5'])} | "
                     f"{number(r['disturbed_oknn']['top1'])} | {number(r['disturbed_oknn']['top5'])} | "
                     f"{'-' if share is None else number(100 * share, '.0f') + ' %'} |")
    lines += ["", "Position share: the part of the O-KNN object features' variance that the objects' "
              "centres explain linearly (0 = none; where an object is, not what it is)."]
    diverged = [n for n in names if not np.isfinite(results[n]["oknn"]["top1"])]
    if diverged:
        lines += ["", f"Not finite: the features of {', '.join(diverged)} are not finite numbers, as those of "
                  "a network whose weights are not (a diverged training)."]
    for key, title, ideal in (("cr", "Coupling rate (CR)", "ideal 1; higher = more coupling"),
                              ("mcs", "Positional bias: mean cosine similarity of a 3×3 grid (MCS)",
                               "ideal 1; lower = more position encoded")):
        lines += ["", f"## {title}", "", f"Per layer, {ideal}.", "",
                  "| network | " + " | ".join(LAYERS) + " |", "|---|" + "---:|" * len(LAYERS)]
        for n in names:
            lines.append(f"| {n} | " + " | ".join(_pm(results[n][key][layer]) for layer in LAYERS) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict, key: str, ylabel: str, path: str, ideal: float = 1.0) -> None:
    """measure vs depth, one line per network, the band between the quartiles."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=120)
    x = np.arange(len(LAYERS))
    for name, r in results.items():
        stats = [r[key][layer] for layer in LAYERS]
        mean = [s["mean"] for s in stats]
        line, = ax.plot(x, mean, marker="o", label=name, linestyle="--" if name.startswith(RANDOM) else "-")
        ax.fill_between(x, [s["q25"] for s in stats], [s["q75"] for s in stats], color=line.get_color(), alpha=0.15)
    ax.axhline(ideal, color="gray", linewidth=0.8, linestyle=":")
    ax.set_xticks(x, LAYERS)
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    from d3ssl.cli import DefaultsHelpFormatter, positive_int
    p = ArgumentParser(prog="python -m d3ssl.eval.report", description=__doc__.split("\n\n")[0],
                       formatter_class=DefaultsHelpFormatter)
    p.add_argument("--ckpt", action="append", default=[],
                   help="checkpoint file or run folder (repeatable; none: only the random-init network)")
    p.add_argument("--label", action="append", default=[],
                   help="name of each --ckpt in the tables, in order (none: each run folder's name)")
    p.add_argument("--no-random", action="store_true", help="leave out the random-init network")
    p.add_argument("--arch", choices=("resnet50", "resnet18"), default=None,
                   help="random-init architecture when no --ckpt is given (none: resnet50); with "
                        "--ckpt the random network takes each checkpoint's")
    p.add_argument("--data", required=True, help="COCO-format folder (annotations/instances_<split>.json)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--train-split", default="train", help="O-KNN: split of the bank")
    p.add_argument("--val-split", default="val", help="O-KNN queries and the CR/MCS objects: their split")
    p.add_argument("--objects-per-image", type=positive_int, default=DEFAULT_OBJECTS_PER_IMAGE,
                   help="O-KNN: at most this many bank objects per train image (class-balanced)")
    p.add_argument("--k", type=positive_int, default=20, help="O-KNN neighbours")
    p.add_argument("--temperature", type=float, default=0.07, help="O-KNN vote temperature")
    p.add_argument("--max-train-images", type=positive_int, default=None,
                   help="O-KNN: use only the first train images (none: all)")
    p.add_argument("--max-val-images", type=positive_int, default=None,
                   help="O-KNN: use only the first val images (none: all)")
    p.add_argument("--image-size", type=positive_int, default=224, help="O-KNN: side the images are resized to, px")
    p.add_argument("--pairs", type=positive_int, default=200, help="CR: object pairs")
    p.add_argument("--cr-image-size", type=positive_int, default=224,
                   help="CR: side of the synthetic pair images, px (a multiple of 32)")
    p.add_argument("--object-size", type=positive_int, default=96, help="CR: longer side of each pasted object, px")
    p.add_argument("--gap", type=int, default=0, help="CR: black pixels between the two objects")
    p.add_argument("--objects", type=positive_int, default=200, help="MCS: objects")
    p.add_argument("--tile-size", type=positive_int, default=96,
                   help="MCS: side of a grid tile, px (a multiple of 32)")
    p.add_argument("--min-object-size", type=float, default=16.0,
                   help="CR/MCS: use objects at least this many px wide and high")
    p.add_argument("--batch-size", type=positive_int, default=16, help="images per forward pass")
    p.add_argument("--seed", type=int, default=0, help="random init, pair/object sampling, disturbed backgrounds")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (none: cuda when a GPU is visible)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv=None) -> dict:
    from d3ssl.model import ResNetC4

    from d3ssl.cli import check_device, check_image_size

    from .export import load_backbone

    p = build_parser()
    a = p.parse_args(argv)
    if not a.ckpt and a.no_random:
        raise SystemExit("error: nothing to evaluate: give --ckpt, or leave out --no-random")
    if a.ckpt and a.arch:
        p.error("--arch sets the random-init network's architecture when no --ckpt is given; with "
                "--ckpt it follows each checkpoint's: leave --arch out")
    check_image_size(p, "--image-size", a.image_size)
    if not a.temperature > 0:
        p.error(f"--temperature must be > 0, got {a.temperature}")
    if os.path.exists(a.out) and not os.path.isdir(a.out):
        p.error(f"--out {a.out!r} is a file; give a folder for the report")
    a.device = check_device(p, "--device", a.device)
    if a.label and len(a.label) != len(a.ckpt):
        raise SystemExit(f"error: --label: give one per --ckpt ({len(a.ckpt)}), got {len(a.label)}")
    # (the measures' own checks, made now rather than after the first network's O-KNN)
    if a.gap < 0:
        p.error(f"--gap must be >= 0, got {a.gap}")
    for flag, size in (("--cr-image-size", a.cr_image_size), ("--tile-size", a.tile_size)):
        if size % PROBE_STRIDE:
            p.error(f"{flag} must be a multiple of {PROBE_STRIDE} (the backbone's stride: each feature cell "
                    f"of the probed layers then covers whole pixels), got {size}")
    if 2 * a.object_size + a.gap > a.cr_image_size:
        p.error(f"--object-size {a.object_size} twice and --gap {a.gap} do not fit side by side in "
                f"--cr-image-size {a.cr_image_size}")
    for name in ("max_train_images", "max_val_images"):
        if getattr(a, name) == 1:
            p.error(f"--{name.replace('_', '-')} must be at least 2: disturbed O-KNN takes each image's "
                    "background from another image of its split")
    progress = not a.no_progress
    try:
        networks = []  # (label, arch, loader)
        for i, ckpt in enumerate(a.ckpt):
            backbone, arch = load_backbone(ckpt)  # fail early, before hours of evaluation
            networks.append((a.label[i] if a.label else run_label(ckpt), arch, backbone))
        labels = [label for label, _, _ in networks]
        if len(set(labels)) < len(labels):  # (each network is one row, keyed by its label)
            if a.label:
                raise ValueError(f"--label: each network needs its own label, got {labels}")
            networks = [(f"{label} ({os.path.basename(ckpt)})" if labels.count(label) > 1 else label, arch, bb)
                        for (label, arch, bb), ckpt in zip(networks, map(_checkpoint_file, a.ckpt))]
            labels = [label for label, _, _ in networks]
            if len(set(labels)) < len(labels):
                raise ValueError(f"--ckpt: two of the checkpoints get the same name ({labels}): name "
                                 "each with --label")
        check_splits(a.data, a.train_split, a.val_split)
        if not a.no_random:
            archs = sorted({arch for _, arch, _ in networks}) or [a.arch or "resnet50"]
            for arch in archs:
                torch.manual_seed(a.seed)
                label = RANDOM if len(archs) == 1 else f"{RANDOM} ({arch})"
                networks.append((label, arch, ResNetC4(arch)))
        objects = load_objects(a.data, a.val_split, a.min_object_size)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    settings = {k: v for k, v in vars(a).items() if k not in ("ckpt", "label", "no_random", "no_progress")}
    os.makedirs(a.out, exist_ok=True)
    results = {}
    t0 = time.time()
    for label, arch, backbone in tqdm(networks, desc="networks", disable=not progress):
        try:  # (the splits' overlap is known once their annotations are read, before any feature)
            results[label] = {"arch": arch,
                              **evaluate_network(backbone, a.data, objects, settings, a.device, progress)}
        except SplitsOverlap as e:
            raise SystemExit(f"error: {e}") from None
        del backbone
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(finite_or_none({"settings": settings, "checkpoints": a.ckpt, "results": results}), f,
                  indent=2)
    with open(os.path.join(a.out, "report.md"), "w") as f:
        f.write(markdown(results, settings))
    plot(results, "cr", "coupling rate (CR)", os.path.join(a.out, "cr.png"))
    plot(results, "mcs", "mean cosine similarity (MCS)", os.path.join(a.out, "mcs.png"))
    print(markdown(results, settings))
    print(f"wrote {a.out}/report.md, cr.png, mcs.png, results.json in {time.time() - t0:.0f} s", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()

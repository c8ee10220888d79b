"""Draws what the region stage does: for a few images, x1, x̂1, x2, x̂2s and x3 with their boxes.

  python -m d3ssl.augment.show IMAGE_OR_DATASET --out grid.png [--num 4] [--seed 0] [--size 224]
  python -m d3ssl.augment.show DATASET --set dp_boxes=1 --set prm=false      # region stage settings
                                                                             (region.prm=false too)

A dataset (a COCO root, its instances JSON, or an image folder) whose proposals store exists at its default place
(``<images>.proposals``, as training leaves it) goes through the training data pipeline: the CPU
loader's views and proposals, colour augmentation off so that only the region stage changes pixels.
Anything else (an image file, a folder without a store) is shown with views built here in the Batch
contract's geometry: view1 = the whole image resized to S x S, view2 = a random resized crop (area
scale [0.4, 1], ratio [3/4, 4/3]) at S, view2_small = view2 at S/2; proposals from OpenCV's
selective search (fast mode, on a downscaled copy) when cv2.ximgproc is available, else random
rectangles; K of them that overlap the crop are kept.
"""
import argparse
import dataclasses
import os

import numpy as np
import torch

from ..cli import ArgumentParser
from ..data.batch import IMAGENET_MEAN, IMAGENET_STD, Batch
from .stage import RegionConfig, region_stage

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
COLOURS = ("#ff3030", "#30c0ff", "#ffd020", "#50ff50", "#ff60ff", "#ffffff", "#ff9000", "#9090ff")


def list_images(path):
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path)
                       if f.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise SystemExit(f"error: no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {path}")
        return files
    if os.path.isfile(path):
        return [path]
    raise SystemExit(f"error: {path} does not exist" if not os.path.exists(path) else
                     f"error: {path} is neither an image file nor a folder")


def read_rgb(path):
    import cv2
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise SystemExit(f"error: could not read image {path}")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def proposals(img, rng, max_side=256, count=200):
    """Candidate boxes [N,4] (x1,y1,x2,y2) in image pixels."""
    import cv2
    h, w = img.shape[:2]
    if hasattr(cv2, "ximgproc"):
        scale = min(1.0, max_side / max(h, w))
        small = cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))))
        ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
        ss.setBaseImage(small)
        ss.switchToSelectiveSearchFast()
        r = ss.process()[:count].astype(np.float64)  # x, y, w, h
        boxes = np.stack([r[:, 0], r[:, 1], r[:, 0] + r[:, 2], r[:, 1] + r[:, 3]], 1) / scale
    else:
        wh = rng.uniform(0.15, 0.6, (count, 2)) * [w, h]
        xy = rng.uniform(0, 1, (count, 2)) * ([w, h] - wh)
        boxes = np.concatenate([xy, xy + wh], 1)
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    keep = (bw >= 0.1 * w) & (bh >= 0.1 * h) & (bw * bh <= 0.6 * w * h)
    return boxes[keep] if keep.any() else np.array([[0, 0, w, h]], dtype=np.float64)


def make_sample(img, rng, size, k):
    """(view1, view2, view2_small as float32 [3,S,S] normalised, boxes1, boxes2 [K,4], valid [K])."""
    import cv2
    h, w = img.shape[:2]
    for _ in range(20):  # random resized crop that keeps some proposals
        area = rng.uniform(0.4, 1.0) * h * w
        ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = min(w, round(np.sqrt(area * ratio))), min(h, round(np.sqrt(area / ratio)))
        cx, cy = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
        boxes = proposals(img, rng)
        inter = np.clip(np.minimum(boxes[:, 2:], [cx + cw, cy + ch]) - np.maximum(boxes[:, :2], [cx, cy]), 0, None)
        inside = inter.prod(1) >= 0.5 * (boxes[:, 2:] - boxes[:, :2]).prod(1)
        if inside.any():
            break
    chosen = boxes[inside] if inside.any() else boxes[:1]
    chosen = chosen[rng.permutation(len(chosen))[:k]]
    n = len(chosen)
    chosen = np.concatenate([chosen, np.repeat(chosen[:1], k - n, 0)])  # pad by repeating
    valid = np.arange(k) < n
    s1 = np.array([size / w, size / h] * 2)
    boxes1 = np.clip(chosen * s1, 0, size)
    boxes2 = np.clip((chosen - [cx, cy, cx, cy]) * np.array([size / cw, size / ch] * 2), 0, size)
    view1 = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    crop = img[cy:cy + ch, cx:cx + cw]
    view2 = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)
    small = cv2.resize(view2, (size // 2, size // 2), interpolation=cv2.INTER_AREA)
    mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
    norm = [torch.from_numpy(((v / 255.0 - mean) / std).transpose(2, 0, 1).astype(np.float32))
            for v in (view1, view2, small)]
    return (*norm, torch.from_numpy(boxes1).float(), torch.from_numpy(boxes2).float(),
            torch.from_numpy(valid))


def region_config(items) -> RegionConfig:
    """RegionConfig from NAME=VALUE strings, read as the trainer reads its --set (train.config)."""
    from train.config import set_field, validate
    cfg = RegionConfig()
    names = [f.name for f in dataclasses.fields(RegionConfig)]
    for item in items:
        name, sep, text = (s.strip() for s in item.partition("="))
        name = name.removeprefix("region.")   # (the trainer's name for the same field)
        if not sep or name not in names:
            raise SystemExit(f"error: --set expects NAME=VALUE with NAME one of {', '.join(names)}, got {item!r}")
        try:
            set_field(cfg, name, text)
        except ValueError as e:
            raise SystemExit(f"error: --set {e}") from None
    try:
        return validate(cfg)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def pipeline_batch(path, num, size, k, seed):
    """The first Batch of the CPU loader for a dataset with a proposals store at its default place,
    colour augmentation off; None when `path` is not such a dataset."""
    from ..data.colour import ColourConfig
    from ..data.datasets import open_dataset
    from ..data.loader import make_loader
    from ..data.proposals import default_store_path
    from ..data.views import ViewConfig
    annotations = os.path.isfile(path) and path.lower().endswith(".json")  # (COCO instances, as --data takes)
    if not os.path.isdir(path) and not annotations:
        return None
    try:
        dataset = open_dataset(path)
        store = default_store_path(dataset)
    except (OSError, ValueError) as e:
        if annotations:
            raise SystemExit(f"error: {path}: {e}") from None
        return None
    if not os.path.isfile(store) or len(dataset) == 0:
        if annotations:
            raise SystemExit(f"error: {path}: " + (f"its proposals store {store} does not exist (`python -m "
                             f"d3ssl.data.proposals --coco {path}` makes it)" if len(dataset) else "no images"))
        return None
    loader = make_loader(dataset, store, backend="cpu", batch_size=min(num, len(dataset)), workers=0,
                         view_cfg=ViewConfig(size=size, num_boxes=k), colour_cfg=ColourConfig(enabled=False),
                         seed=seed, drop_last=False)
    loader.set_epoch(0)
    return next(iter(loader))


def to_rgb(view):
    """float [3,H,W] normalised -> uint8 [H,W,3]."""
    x = view.float().cpu() * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]
    return (x.clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)


def draw(views, out, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    cols = [("x1", "x1", "boxes_x1"), ("x̂1 = PRM∘PRC(x1)", "x1_hat", "boxes_x1_hat"),
            ("x2", "x2", "boxes_x2"), ("x̂2s = PRM∘PRC(x2s)", "x2s_hat", "boxes_x2s_hat"),
            ("x3 (de-positioning)", "x3", "boxes_x3")]
    cols = [c for c in cols if getattr(views, c[1]) is not None]
    rows = views.x1.shape[0]
    fig, axes = plt.subplots(rows, len(cols), figsize=(3 * len(cols), 3 * rows), squeeze=False)
    for i in range(rows):
        for j, (title, name, boxes_name) in enumerate(cols):
            ax = axes[i][j]
            img = getattr(views, name)[i]
            ax.imshow(to_rgb(img), extent=(0, img.shape[-1], img.shape[-2], 0))
            valid = views.valid_x3 if name == "x3" and views.valid_x3 is not None else views.valid
            for k, box in enumerate(getattr(views, boxes_name)[i].tolist()):
                if valid[i, k]:
                    ax.add_patch(Rectangle((box[0], box[1]), box[2] - box[0], box[3] - box[1],
                                           fill=False, lw=1.5, ec=COLOURS[k % len(COLOURS)]))
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=10)
    fig.suptitle("region stage (fill 0 = mean colour; box colour = proposal)", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)


def main(argv=None):
    p = ArgumentParser(prog="python -m d3ssl.augment.show", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="a dataset (COCO root or image folder) with its proposals store, an image "
                               "folder, or an image file")
    p.add_argument("--out", default="grid.png", help="PNG to write (default grid.png)")
    p.add_argument("--num", type=int, default=4, help="images to show (default 4); fewer image files are "
                   "drawn again in turn, each time with other views and augmentations")
    p.add_argument("--seed", type=int, default=0, help="seed of views, proposals and augmentations (default 0)")
    p.add_argument("--size", type=int, default=224, help="view size S (default 224)")
    p.add_argument("--k", type=int, default=4, help="proposals per image (default 4)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="a region stage setting (a RegionConfig field), e.g. dp_boxes=1 or prc=false; repeatable")
    args = p.parse_args(argv)
    if args.num < 1 or args.k < 1 or args.size < 2 or args.size % 2:
        raise SystemExit("error: --num and --k must be >= 1 and --size an even number >= 2")
    from d3ssl.cli import check_output_file
    check_output_file(p, "--out", args.out)
    cfg = region_config(args.set)
    import d3ssl  # noqa: F401  (loads the operator library)

    batch = pipeline_batch(args.path, args.num, args.size, args.k, args.seed)
    source, files = "the data pipeline", ()
    if batch is None:
        files = list_images(args.path)
        rng = np.random.default_rng(args.seed)
        samples = [make_sample(read_rgb(files[i % len(files)]), rng, args.size, args.k)
                   for i in range(args.num)]
        parts = [torch.stack([s[j] for s in samples]) for j in range(6)]
        views = [v.contiguous(memory_format=torch.channels_last) for v in parts[:3]]
        batch = Batch(*views, parts[3], parts[4], parts[5], torch.arange(args.num)).validate()
        source = "views and proposals built here"
    out = region_stage(batch, torch.Generator().manual_seed(args.seed), cfg)
    draw(out, args.out, args.path)
    drawn = len(batch.image_id)
    print(f"wrote {args.out} ({drawn} images from {args.path}; {source})" if not files or len(files) >= drawn else
          f"wrote {args.out} ({drawn} draws of the {len(files)} image(s) of {args.path}; {source})")
    return out


if __name__ == "__main__":
    main()

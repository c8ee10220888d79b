"""Selective-search proposals: images/s per core of the default setting against the pure-Python
selective search SoCo's generator uses (``pip install selectivesearch``; scale 500, sigma 0.9,
min_size 10, at full resolution), in the same run, one process each, on photo-sized images
(0.2-0.4 MP: scikit-image's sample photos when available, plus synthetic scenes at 480-640 px).

Each side's time covers what its generator does per image: decode the file, run selective search,
filter. Extra figures: the recall of the full-resolution run's filtered boxes by the default run's
boxes at IoU >= 0.7, boxes per image, duplicates the anchor keeps, and the same for other sizes of
the downscaled copy (the measurements behind the default ``max_side``).
"""
from __future__ import annotations

import os
import tempfile
import time

import cv2
import numpy as np

from benchmarks.common import Row, interleaved

RECALL_IOU = 0.7
SIZES = (160, 192, 256, 320)


def _photos(quick: bool) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
    """BGR uint8 images of 0.2-0.4 MP, and their ground-truth boxes [G,4] x1,y1,x2,y2 (None: unknown)."""
    out, gt = [], []
    try:
        import skimage.data as data
        names = ["astronaut", "coffee", "rocket", "chelsea"] + ([] if quick else ["immunohistochemistry", "cat"])
        for n in names:
            img = getattr(data, n)()
            if img.ndim == 3 and img.shape[2] == 3:
                h, w = img.shape[:2]
                f = max(1.0, np.sqrt(0.25e6 / (h * w)))           # small ones upscaled to ~0.25 MP
                img = cv2.resize(img, (round(w * f), round(h * f)), interpolation=cv2.INTER_CUBIC)
                out.append(np.ascontiguousarray(img[:, :, ::-1]))
                gt.append(None)
    except ImportError:
        pass
    from d3ssl.data.synthetic import render_image
    for i in range(2 if quick else 4):
        rng = np.random.default_rng([99, i])
        img, objects = render_image(rng, int(rng.integers(560, 640)), int(rng.integers(420, 480)))
        out.append(img)
        gt.append(np.array([[x, y, x + w, y + h] for _, x, y, w, h, _ in objects], np.float32))
    return out, gt


def _iou(a, b):
    x1 = np.maximum(a[:, None, 0], b[None, :, 0]); y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2]); y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]); area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None] - inter, 1e-9)


def _recall(ref, got):
    if not len(ref):
        return 1.0
    return float((_iou(ref, got).max(1) >= RECALL_IOU).mean())


def _soco_anchor(rgb):
    """SoCo's generator: pure-Python selective search at full size, duplicates kept by rect only."""
    import selectivesearch
    _, regions = selectivesearch.selective_search(rgb, scale=500, sigma=0.9, min_size=10)
    return [r["rect"] for r in regions]


def run(args) -> list[Row]:
    from d3ssl.data.proposals import ProposalConfig, filter_boxes, proposals_for_image, selective_search

    cv2.setNumThreads(1)                       # per core: one process, one thread, both sides
    images, gt = _photos(args.quick)
    tmp = tempfile.mkdtemp(prefix="d3ssl-bench-proposals-")
    paths = []
    for i, img in enumerate(images):
        paths.append(os.path.join(tmp, f"{i}.jpg"))
        cv2.imwrite(paths[-1], img, [cv2.IMWRITE_JPEG_QUALITY, 92])
    mp = np.mean([im.shape[0] * im.shape[1] for im in images]) / 1e6
    cfg = ProposalConfig()

    def ours(max_side=cfg.max_side):
        c = ProposalConfig(max_side=max_side)
        return [proposals_for_image(cv2.imread(p), p, c) for p in paths]

    try:
        import selectivesearch  # noqa: F401
        anchor_name = "selectivesearch (pure Python, SoCo's generator, full size)"

        def anchor():
            return [_soco_anchor(cv2.cvtColor(cv2.imread(p), cv2.COLOR_BGR2RGB)) for p in paths]
    except ImportError:
        anchor_name = "our OpenCV selective search at full resolution (selectivesearch not installed)"

        def anchor():
            return [selective_search(cv2.imread(p), max_side=10 ** 6) for p in paths]

    secs = interleaved({"ours": ours, "anchor": anchor}, rounds=1 if args.quick else 3, warmup=0,
                       min_time=0.0, min_calls=1)
    n = len(paths)

    # recall against the full-resolution run (filtered, uncapped), per max_side
    full = [filter_boxes(selective_search(im, max_side=10 ** 6), im.shape[1], im.shape[0], cfg)[0]
            for im in images]
    default_boxes = ours()
    extra = {"images": f"{n} photos, mean {mp:.2f} MP", "threads": 1,
             f"recall@IoU{RECALL_IOU} of full-res filtered boxes": round(np.mean(
                 [_recall(f, d) for f, d in zip(full, default_boxes)]), 3),
             "boxes/image (default, capped at max_boxes)": round(np.mean([len(b) for b in default_boxes]), 1),
             "boxes/image (full res, filtered)": round(np.mean([len(b) for b in full]), 1)}
    with_gt = [i for i, g in enumerate(gt) if g is not None]
    if with_gt:
        for iou in (0.5, 0.7):
            rec = [(float((_iou(gt[i], default_boxes[i]).max(1) >= iou).mean()),
                    float((_iou(gt[i], full[i]).max(1) >= iou).mean())) for i in with_gt]
            extra[f"object recall@IoU{iou} on synthetic scenes, default / full res"] = \
                f"{np.mean([r[0] for r in rec]):.3f} / {np.mean([r[1] for r in rec]):.3f}"
    anchor_out = anchor()
    if anchor_name.startswith("selectivesearch"):
        extra["anchor rects/image (duplicates)"] = (
            f"{np.mean([len(r) for r in anchor_out]):.0f} "
            f"({np.mean([len(r) - len(set(r)) for r in anchor_out]):.0f})")
    if not args.quick:
        for s in SIZES:
            t0 = time.perf_counter()
            got = ours(s)
            dt = time.perf_counter() - t0
            recall = np.mean([_recall(f, g) for f, g in zip(full, got)])
            extra[f"max_side {s}"] = (f"{n / dt:.2f} img/s, recall {recall:.3f} "
                                      f"({np.mean([len(g) for g in got]):.0f} boxes/img)")
    return [Row("proposals", f"selective search, fast, max_side {cfg.max_side}", n / secs["ours"], n / secs["anchor"],
                anchor_name, unit="images/s per core", target=3.0, extra=extra)]

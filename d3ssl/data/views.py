"""The view sampler: per sample, the geometry of the two views and the K proposals they share.

It returns numbers only (crop window, flips, boxes in view pixels), so the CPU loader and the DALI
loader apply the same views. Conventions (pixel-edge coordinates, as torchvision's boxes):

- view 1 is the whole image resized to S x S (aspect not kept, as SoCo); an image point (x, y) lands
  at (x * S/W, y * S/H).
- view 2 is the crop window (x0, y0, w, h) -- integer-valued, inside the image -- resized to S x S;
  (x, y) lands at ((x - x0) * S/w, (y - y0) * S/h). view2_small is view 2 at S/2 (boxes / 2).
- a horizontal flip maps x to S - x (boxes: x1' = S - x2, x2' = S - x1).

Proposal selection (SoCo's): a proposal survives a crop when its part inside the crop covers at least
``min_overlap`` of the proposal and is at least ``min_box_size`` view pixels wide and high in both
views. When fewer than K survive, the crop is drawn again (up to ``crop_retries`` times) and the crop
with the most survivors is kept. K survivors are drawn at random; with fewer, rows are repeated in
order to fill K and marked invalid (``valid`` False) except the first occurrence of each. If no
proposal survives any crop, the crop window itself is the one valid box (the region both views
share), so every sample has at least one valid box.

Each box is clipped to each view: in view 1 to the image, in view 2 to the crop.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class ViewConfig:
    size: int = 224                                 # S: side of view 1 and view 2 (px); view2_small is S/2
    crop_scale: tuple[float, float] = (0.4, 1.0)    # area of the view-2 crop / image area
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # w/h of the view-2 crop (log-uniform)
    num_boxes: int = 4                              # K proposals per sample
    crop_retries: int = 10                          # crops drawn in total when fewer than K survive
    flip_p: float = 0.5                             # probability of a horizontal flip, per view
    min_box_size: float = 16.0                      # survivors are >= this wide and high in both views (px)
    min_overlap: float = 0.5                        # part of the proposal inside the crop, by area

    def __post_init__(self):
        if self.size < 2 or self.size % 2:
            raise ValueError(f"ViewConfig.size must be an even number >= 2 (view2_small is size/2), got {self.size}")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"ViewConfig.crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
        lo, hi = self.crop_ratio
        if not 0 < lo <= hi:
            raise ValueError(f"ViewConfig.crop_ratio must satisfy 0 < min <= max, got {self.crop_ratio}")
        if self.num_boxes < 1:
            raise ValueError(f"ViewConfig.num_boxes must be >= 1, got {self.num_boxes}")
        if self.crop_retries < 1:
            raise ValueError(f"ViewConfig.crop_retries must be >= 1, got {self.crop_retries}")


@dataclass
class ViewParams:
    """The geometry of one sample. Boxes are x1,y1,x2,y2 in view pixels, after the flips."""
    crop: tuple[float, float, float, float]   # x0, y0, w, h of view 2 in image pixels (integer-valued)
    flip1: bool
    flip2: bool
    boxes1: np.ndarray                        # float32 [K,4], view-1 pixels
    boxes2: np.ndarray                        # float32 [K,4], view-2 pixels; row k = same proposal
    valid: np.ndarray                         # bool [K]; False for padding rows


def sample_seed(base_seed: int, epoch: int, index: int) -> int:
    """The per-sample seed both loader backends use: a hash of (base_seed, epoch, index), so a sample's
    views depend on nothing else (not on workers, ranks or batch order)."""
    return int(np.random.SeedSequence([int(base_seed) & 0xFFFFFFFF, int(epoch), int(index)]).generate_state(1)[0])


def random_resized_crop(image_w: int, image_h: int, rng: np.random.Generator, scale, ratio, attempts: int = 10):
    """torchvision's RandomResizedCrop window: integer (x0, y0, w, h) inside the image."""
    area = image_w * image_h
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        target = area * rng.uniform(scale[0], scale[1])
        r = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * r)))
        h = int(round(math.sqrt(target / r)))
        if 0 < w <= image_w and 0 < h <= image_h:
            x0 = int(rng.integers(0, image_w - w + 1))
            y0 = int(rng.integers(0, image_h - h + 1))
            return x0, y0, w, h
    # fallback, as torchvision: the central crop with the ratio clamped to the allowed range
    in_ratio = image_w / image_h
    if in_ratio < ratio[0]:
        w, h = image_w, int(round(image_w / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = image_h, int(round(image_h * ratio[1]))
    else:
        w, h = image_w, image_h
    w, h = max(1, min(w, image_w)), max(1, min(h, image_h))
    return (image_w - w) // 2, (image_h - h) // 2, w, h


def _survivors(props, crop, sx1, sy1, cfg):
    """Indices of proposals that survive `crop`, with their boxes clipped to the crop."""
    x0, y0, w, h = crop
    cx = np.clip(props[:, [0, 2]], x0, x0 + w)
    cy = np.clip(props[:, [1, 3]], y0, y0 + h)
    iw, ih = cx[:, 1] - cx[:, 0], cy[:, 1] - cy[:, 0]
    area = (props[:, 2] - props[:, 0]) * (props[:, 3] - props[:, 1])
    s = cfg.size
    ok = (iw * ih >= cfg.min_overlap * area) & (iw * ih > 0)
    ok &= (iw * s / w >= cfg.min_box_size) & (ih * s / h >= cfg.min_box_size)
    # view 1 sees the whole proposal (clipped to the image)
    ok &= (props[:, 2] - props[:, 0]) * sx1 >= cfg.min_box_size
    ok &= (props[:, 3] - props[:, 1]) * sy1 >= cfg.min_box_size
    return np.nonzero(ok)[0]


def sample_views(image_w: int, image_h: int, proposals: np.ndarray, rng: np.random.Generator,
                 cfg: ViewConfig = ViewConfig()) -> ViewParams:
    """Draws the views of one sample.

    Args:
        image_w, image_h: image size in pixels.
        proposals: float [N,4] x1,y1,x2,y2 in image pixels (N may be 0).
        rng: the sample's generator (``np.random.default_rng(sample_seed(...))``).
    """
    if image_w < 1 or image_h < 1:
        raise ValueError(f"sample_views: image size must be positive, got {image_w}x{image_h}")
    s, k = cfg.size, cfg.num_boxes
    props = np.asarray(proposals, np.float64).reshape(-1, 4)
    props = np.stack([np.clip(props[:, 0], 0, image_w), np.clip(props[:, 1], 0, image_h),
                      np.clip(props[:, 2], 0, image_w), np.clip(props[:, 3], 0, image_h)], 1)
    sx1, sy1 = s / image_w, s / image_h

    best_crop, best = None, np.zeros(0, np.int64)
    for _ in range(cfg.crop_retries):
        crop = random_resized_crop(image_w, image_h, rng, cfg.crop_scale, cfg.crop_ratio)
        surv = _survivors(props, crop, sx1, sy1, cfg) if len(props) else np.zeros(0, np.int64)
        if best_crop is None or len(surv) > len(best):
            best_crop, best = crop, surv
        if len(best) >= k:
            break
    crop = best_crop
    x0, y0, w, h = crop
    if len(best):
        chosen = rng.choice(best, size=min(k, len(best)), replace=False)
        sel = props[chosen]
    else:
        sel = np.array([[x0, y0, x0 + w, y0 + h]], np.float64)     # the region both views share
    n = len(sel)
    order = np.arange(k) % n
    valid = np.arange(k) < n
    sel = sel[order]

    b1 = sel * np.array([sx1, sy1, sx1, sy1])
    c = np.stack([np.clip(sel[:, 0], x0, x0 + w), np.clip(sel[:, 1], y0, y0 + h),
                  np.clip(sel[:, 2], x0, x0 + w), np.clip(sel[:, 3], y0, y0 + h)], 1)
    b2 = (c - np.array([x0, y0, x0, y0])) * np.array([s / w, s / h, s / w, s / h])
    flip1 = bool(rng.random() < cfg.flip_p)
    flip2 = bool(rng.random() < cfg.flip_p)
    if flip1:
        b1 = np.stack([s - b1[:, 2], b1[:, 1], s - b1[:, 0], b1[:, 3]], 1)
    if flip2:
        b2 = np.stack([s - b2[:, 2], b2[:, 1], s - b2[:, 0], b2[:, 3]], 1)
    return ViewParams(crop=(float(x0), float(y0), float(w), float(h)), flip1=flip1, flip2=flip2,
                      boxes1=np.clip(b1, 0, s).astype(np.float32), boxes2=np.clip(b2, 0, s).astype(np.float32),
                      valid=valid)

"""Disturbed O-KNN (paper §5.3, table 4): O-KNN with every pixel outside the image's selected
ground-truth boxes replaced by another image.

The object features are extracted exactly as for O-KNN (:mod:`d3ssl.eval.oknn`); only the image
changes, through O-KNN's image hook. Of the n images O-KNN reads from a split, image i's background
is image ``background_index(n, seed)[i]`` (never i itself), resized to image i's size.

The paper keeps "the feature extraction pipeline the same" and does not say whether the bank's
images are disturbed too. Named default ``disturb_bank=True``: bank and queries alike, so that both
sides of the vote see the same kind of image (False disturbs the queries only). A fixed seed gives the same disturbed images every time, so checkpoints
are compared on the same inputs.
"""
from __future__ import annotations

import numpy as np
import cv2


def keep_mask(height: int, width: int, boxes: np.ndarray) -> np.ndarray:
    """bool [H,W]: the pixels covered by any box (x1,y1,x2,y2 in pixels), boxes rounded outwards.

    A pixel (x, y) spans [x, x+1) × [y, y+1); it is kept when that square meets a box with positive
    area, so every pixel the box touches keeps the object's value.
    """
    mask = np.zeros((height, width), bool)
    for x1, y1, x2, y2 in np.asarray(boxes, np.float64).reshape(-1, 4):
        c1, r1 = max(0, int(np.floor(x1))), max(0, int(np.floor(y1)))
        c2, r2 = min(width, int(np.ceil(x2))), min(height, int(np.ceil(y2)))
        if c2 > c1 and r2 > r1:
            mask[r1:r2, c1:c2] = True
    return mask


def replace_background(image: np.ndarray, boxes: np.ndarray, background: np.ndarray) -> np.ndarray:
    """``image`` inside ``boxes``, ``background`` (resized to the image's size, bilinear) everywhere else.

    Args:
        image: uint8 [H,W,3]. boxes: [N,4] x1,y1,x2,y2 in pixels of ``image``. background: uint8 [h,w,3].
    Returns:
        uint8 [H,W,3], a new array.
    """
    if image.ndim != 3 or background.ndim != 3 or image.shape[2] != background.shape[2]:
        raise ValueError(f"image, background: expected [H,W,C] arrays with the same C, got {image.shape} and "
                         f"{background.shape}")
    h, w = image.shape[:2]
    out = cv2.resize(np.ascontiguousarray(background), (w, h), interpolation=cv2.INTER_LINEAR)
    mask = keep_mask(h, w, boxes)
    out[mask] = image[mask]
    return out


def background_index(num_images: int, seed: int = 0) -> np.ndarray:
    """int64 [num_images]: for image i, the index of the image that replaces its background (never i)."""
    if num_images < 2:
        raise ValueError(f"data: disturbed O-KNN needs at least 2 images per split, got {num_images}")
    rng = np.random.default_rng(seed)
    offset = rng.integers(1, num_images, size=num_images)  # in [1, n-1]: i + offset ≠ i mod n
    return (np.arange(num_images) + offset) % num_images


class BackgroundReplacer:
    """O-KNN image hook (``ObjectImages``' ``image_hook``) that replaces each image's background.

    ``hook(records, i, image, boxes)``: ``records`` are O-KNN's per-image records (path first),
    ``boxes`` the selected ground-truth boxes of image i in its pixels. The background comes from
    record ``background_index(len(records), seed)[i]``. Picklable, so loader workers can use it.
    """

    def __init__(self, seed: int = 0):
        self.seed = seed
        self._partner: np.ndarray | None = None

    def __call__(self, records, index: int, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        if self._partner is None or len(self._partner) != len(records):
            self._partner = background_index(len(records), self.seed)
        from .probe import read_rgb
        return replace_background(image, boxes, read_rgb(records[int(self._partner[index])][0]))


def evaluate_disturbed_oknn(backbone, data_root: str, seed: int = 0, disturb_bank: bool = True,
                            **oknn_kwargs) -> dict:
    """Disturbed O-KNN: :func:`~d3ssl.eval.oknn.evaluate_oknn` with every image's background (all
    pixels outside its selected boxes) replaced by another image of its split.

    Args:
        backbone, data_root, **oknn_kwargs: as for ``evaluate_oknn``.
        seed: choice of the background images.
        disturb_bank: also disturb the bank's (train split's) images (default); False: queries only.
    Returns:
        as ``evaluate_oknn``: {"top1", "top5" (percent), "bank_size", "num_queries",
        "position_share" (with 3 queries or more)}.
    """
    from .oknn import evaluate_oknn
    return evaluate_oknn(backbone, data_root, image_hook=BackgroundReplacer(seed), hook_bank=disturb_bank,
                         **oknn_kwargs)

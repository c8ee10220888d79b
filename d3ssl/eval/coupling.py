"""Coupling rate (CR), per layer (paper §3.1, figure 3).

Objects A and B of different categories are cut from ground-truth boxes. Image 1 shows A and B side
by side on black; image 2 shows only A, at the same place. With f(·) the feature of a layer pooled over
an object's box,

    CR = cos(f(A in image 1), f(B)) / cos(f(A in image 2), f(B)),     f(B) read from image 1.

CR = 1 when B's presence leaves A's feature unchanged; the larger the receptive field mixes B into A,
the further CR moves from 1 (in trained networks, above 1: A's feature becomes more like B's).
Features are pooled with :func:`~d3ssl.eval.probe.box_average_pool` (exact area-weighted average).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .probe import (LAYERS, GroundTruthObject, box_average_pool, check_probe_size, cosine, crop_object, fit_resize,
                    layer_features, normalize_images)


def compose_pair(crop_a: np.ndarray, crop_b: np.ndarray, image_size: int = 224, object_size: int = 96,
                 gap: int = 0):
    """Images 1 and 2 of one CR measurement.

    Each crop is resized (aspect kept) so its longer side is ``object_size`` px. A sits left of the
    image's vertical centre line, B right of it, ``gap`` px apart, both centred vertically; the rest
    is black (RGB 0).

    Returns:
        image1 uint8 [S,S,3] (A and B), image2 uint8 [S,S,3] (A only), box_a, box_b: float [4] x1,y1,x2,y2 px.
    """
    if gap < 0:
        raise ValueError(f"gap must be >= 0 px (a negative one pastes B over A), got {gap}")
    if 2 * object_size + gap > image_size:
        raise ValueError(f"object_size: two objects of {object_size} px and a gap of {gap} px do not fit "
                         f"side by side in an image of {image_size} px")
    a, b = fit_resize(crop_a, object_size), fit_resize(crop_b, object_size)
    image1 = np.zeros((image_size, image_size, 3), np.uint8)
    image2 = np.zeros_like(image1)
    centre = image_size // 2
    ax2 = centre - gap // 2
    ax1 = ax2 - a.shape[1]
    ay1 = (image_size - a.shape[0]) // 2
    bx1 = ax2 + gap
    by1 = (image_size - b.shape[0]) // 2
    image1[ay1:ay1 + a.shape[0], ax1:ax2] = a
    image2[ay1:ay1 + a.shape[0], ax1:ax2] = a
    image1[by1:by1 + b.shape[0], bx1:bx1 + b.shape[1]] = b
    box_a = np.array([ax1, ay1, ax2, ay1 + a.shape[0]], np.float64)
    box_b = np.array([bx1, by1, bx1 + b.shape[1], by1 + b.shape[0]], np.float64)
    return image1, image2, box_a, box_b


def sample_pairs(objects: list[GroundTruthObject], num_pairs: int, seed: int = 0) -> list[tuple[int, int]]:
    """``num_pairs`` index pairs (a, b) of objects of different categories, drawn with ``seed``."""
    categories = np.array([o.category for o in objects])
    if len(np.unique(categories)) < 2:
        raise ValueError("data: the coupling rate needs objects of at least two categories")
    rng = np.random.default_rng(seed)
    pairs = []
    while len(pairs) < num_pairs:
        a, b = rng.integers(len(objects), size=2)
        if categories[a] != categories[b]:
            pairs.append((int(a), int(b)))
    return pairs


@torch.no_grad()
def coupling_rate_images(backbone: nn.Module, image1: torch.Tensor, image2: torch.Tensor, box_a: torch.Tensor,
                         box_b: torch.Tensor, layers: tuple[str, ...] = LAYERS) -> dict[str, torch.Tensor]:
    """CR of each layer for a batch of prepared pairs.

    Args:
        image1, image2: float [N,3,S,S] normalised images (A and B; A only).
        box_a, box_b: float [N,4] boxes in pixels.
    Returns:
        layer → float64 [N] coupling rates. The backbone runs in eval mode (see
        :func:`~d3ssl.eval.probe.layer_features`), so a pair's rate does not depend on the others.
        A denominator cos(A2, B) of 0 (features that are all zero) is taken as 1e-12.
    """
    size = tuple(image1.shape[-2:])
    both = layer_features(backbone, torch.cat([image1, image2]), layers)
    n = image1.shape[0]
    boxes = torch.stack([box_a, box_b], 1).to(image1.device)  # [N,2,4]
    out = {}
    for name, fmap in both.items():
        f1 = box_average_pool(fmap[:n], boxes, size)            # [N,2,C]: A1, B
        fa2 = box_average_pool(fmap[n:], boxes[:, :1], size)[:, 0]  # [N,C]: A2
        out[name] = cosine(f1[:, 0], f1[:, 1]) / cosine(fa2, f1[:, 1]).clamp(min=1e-12)
    return out


@torch.no_grad()
def coupling_rate(backbone: nn.Module, objects: list[GroundTruthObject], num_pairs: int = 200,
                  image_size: int = 224, object_size: int = 96, gap: int = 0, seed: int = 0,
                  batch_size: int = 16, device: torch.device | str = "cpu", layers: tuple[str, ...] = LAYERS,
                  progress: bool = True) -> dict[str, np.ndarray]:
    """Coupling rate of each layer over ``num_pairs`` object pairs of different categories.

    Args:
        backbone: ResNet in torchvision's layout; run in eval mode (its mode is restored afterwards).
        objects: ground-truth objects (:func:`~d3ssl.eval.probe.load_objects`).
        image_size: side of the synthetic images, px. object_size: longer side of each pasted object, px.
        gap: black pixels between A and B. seed: pair sampling.
        image_size must be a multiple of 32 (the backbone's stride), so that every feature cell
        covers whole pixels of the image.
    Returns:
        layer → float64 [num_pairs] coupling rates (summarise with :func:`~d3ssl.eval.probe.summarize`:
        the report gives their mean over pairs, not a ratio of mean similarities, with the quartiles).
    """
    check_probe_size(image_size, "image_size")
    pairs = sample_pairs(objects, num_pairs, seed)
    results = {name: [] for name in layers}
    crops: dict[int, np.ndarray] = {}

    def crop(i):
        if i not in crops:
            crops[i] = crop_object(objects[i])
        return crops[i]

    for start in tqdm(range(0, len(pairs), batch_size), desc="coupling rate", disable=not progress,
                      leave=False):
        i1, i2, ba, bb = [], [], [], []
        for a, b in pairs[start:start + batch_size]:
            im1, im2, box_a, box_b = compose_pair(crop(a), crop(b),
                                                  image_size, object_size, gap)
            i1.append(im1), i2.append(im2), ba.append(box_a), bb.append(box_b)
        cr = coupling_rate_images(backbone, normalize_images(np.stack(i1), device),
                                  normalize_images(np.stack(i2), device),
                                  torch.as_tensor(np.stack(ba)), torch.as_tensor(np.stack(bb)), layers)
        for name in layers:
            results[name].append(cr[name].cpu().numpy())
    return {name: np.concatenate(v) for name, v in results.items()}

"""Positional bias: mean cosine similarity (MCS) of a 3×3 grid, per layer (paper §3.2, figure 4).

One object crop is resized to a tile and repeated in a 3×3 grid. Each tile's feature is the layer's
map pooled over the tile (:func:`~d3ssl.eval.probe.box_average_pool`); MCS is the mean cosine
similarity between the centre tile's feature and the eight others. The tiles are identical, so only
position (zero padding at the image border) can make them differ: ideal MCS = 1, and lower means the
layer encodes more position.

The tile side defaults to a multiple of 32, the stride of layer4, so every tile starts on a cell
boundary of every layer: differences then come from the network, not from sampling phase.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .probe import (LAYERS, GroundTruthObject, box_average_pool, check_probe_size, cosine, crop_object, layer_features,
                    normalize_images)

#: Tile order: row-major over the grid; index 4 is the centre.
CENTRE = 4


def tile_grid(crop: np.ndarray, tile_size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """The crop resized to ``tile_size``² (aspect not kept: every tile is the whole object) and tiled 3×3.

    Returns:
        image uint8 [3T,3T,3]; boxes float [9,4] x1,y1,x2,y2 px of the tiles, row-major (centre = 4).
    """
    if tile_size < 1:
        raise ValueError(f"tile_size: expected a positive number of pixels, got {tile_size}")
    # one axis at a time: area averaging along an axis that shrinks (no aliasing), bilinear along one
    # that grows (an elongated crop does both)
    tile = np.ascontiguousarray(crop)
    for axis, size in ((1, (tile_size, tile.shape[0])), (0, (tile_size, tile_size))):
        shrinks = tile.shape[axis] > tile_size
        tile = cv2.resize(tile, size, interpolation=cv2.INTER_AREA if shrinks else cv2.INTER_LINEAR)
    image = np.tile(tile, (3, 3, 1))
    boxes = np.array([[c * tile_size, r * tile_size, (c + 1) * tile_size, (r + 1) * tile_size]
                      for r in range(3) for c in range(3)], np.float64)
    return image, boxes


@torch.no_grad()
def grid_similarity(backbone: nn.Module, images: torch.Tensor, boxes: torch.Tensor,
                    layers: tuple[str, ...] = LAYERS) -> dict[str, torch.Tensor]:
    """MCS of each layer for a batch of 3×3 grid images.

    Args:
        images: float [N,3,3T,3T] normalised grids. boxes: float [N,9,4] tile boxes in pixels (centre = 4).
    Returns:
        layer → float64 [N]: mean over the 8 outer tiles of cos(f(centre), f(tile)). The backbone
        runs in eval mode (see :func:`~d3ssl.eval.probe.layer_features`).
    """
    size = tuple(images.shape[-2:])
    out = {}
    for name, fmap in layer_features(backbone, images, layers).items():
        f = box_average_pool(fmap, boxes.to(images.device), size)  # [N,9,C]
        sims = cosine(f[:, CENTRE:CENTRE + 1], f)                   # [N,9]
        others = [i for i in range(9) if i != CENTRE]
        out[name] = sims[:, others].mean(1)
    return out


@torch.no_grad()
def mean_cosine_similarity(backbone: nn.Module, objects: list[GroundTruthObject], num_objects: int = 200,
                           tile_size: int = 96, seed: int = 0, batch_size: int = 16,
                           device: torch.device | str = "cpu", layers: tuple[str, ...] = LAYERS,
                           progress: bool = True) -> dict[str, np.ndarray]:
    """MCS of each layer over ``num_objects`` objects drawn with ``seed`` (all of them if fewer).

    Args:
        backbone: ResNet in torchvision's layout; run in eval mode (its mode is restored afterwards).
        objects: ground-truth objects (:func:`~d3ssl.eval.probe.load_objects`).
        tile_size: side of one grid tile, px (the grid image is 3·tile_size px square); a multiple
            of 32 (the backbone's stride), so that every feature cell covers whole pixels.
    Returns:
        layer → float64 [num_objects] MCS values (summarise with :func:`~d3ssl.eval.probe.summarize`).
    """
    check_probe_size(tile_size, "tile_size")
    rng = np.random.default_rng(seed)
    picked = rng.permutation(len(objects))[:num_objects]
    results = {name: [] for name in layers}
    for start in tqdm(range(0, len(picked), batch_size), desc="positional bias", disable=not progress,
                      leave=False):
        grids = [tile_grid(crop_object(objects[i]), tile_size) for i in picked[start:start + batch_size]]
        images = normalize_images(np.stack([g[0] for g in grids]), device)
        boxes = torch.as_tensor(np.stack([g[1] for g in grids]))
        mcs = grid_similarity(backbone, images, boxes, layers)
        for name in layers:
            results[name].append(mcs[name].cpu().numpy())
    return {name: np.concatenate(v) for name, v in results.items()}

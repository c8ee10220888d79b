"""Shared pieces of the layer-wise diagnostics (coupling rate, positional bias).

Both measures feed synthetic images built from ground-truth object crops through the backbone, read
the feature map of every probed layer and pool it over boxes. This module holds what they share:
the probed layers, the per-layer forward pass, exact box pooling, and the ground-truth objects of a
COCO-format dataset.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch import nn

#: The probed layers, in depth order, named as in torchvision's ResNet (paper figures 3b and 4b).
LAYERS = ("conv1", "layer1", "layer2", "layer3", "layer4")

#: ImageNet statistics, on the 0..1 scale; the views of training are normalised with them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_STEM = ("conv1", "bn1", "relu", "maxpool")


def resnet_modules(backbone: nn.Module) -> dict[str, nn.Module]:
    """The backbone's modules under torchvision's ResNet names: conv1, bn1, relu, maxpool, layer1..layer4.

    Accepts a torchvision ResNet (or anything with those attributes) and :class:`d3ssl.model.ResNetC4`
    (``trunk`` = conv1, bn1, relu, maxpool, layer1..3; ``res5`` = layer4). Raises ``TypeError`` otherwise.
    """
    names = _STEM + LAYERS[1:]
    if all(hasattr(backbone, name) for name in names):
        return {name: getattr(backbone, name) for name in names}
    trunk, res5 = getattr(backbone, "trunk", None), getattr(backbone, "res5", None)
    if isinstance(trunk, nn.Sequential) and len(trunk) == 7 and isinstance(res5, nn.Module):
        return dict(zip(names, list(trunk) + [res5]))
    raise TypeError(
        f"backbone: expected a ResNet in torchvision's layout (conv1, bn1, relu, maxpool, layer1..layer4) "
        f"or a ResNetC4 (trunk, res5), got {type(backbone).__name__}")


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    """Runs the block with ``module`` in eval mode (BatchNorm on its running statistics, which stay
    as they are), then restores the mode it had."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def layer_features(backbone: nn.Module, images: torch.Tensor,
                   layers: tuple[str, ...] = LAYERS) -> dict[str, torch.Tensor]:
    """Feature map of each probed layer for a batch of whole images.

    ``conv1`` is read after conv1 → bn1 → relu (before the max-pool); ``layerN`` after the stage.
    layer4 (res5) is applied to the whole map here, not to RoIs: its convolutions are the same ones.
    The backbone runs in eval mode (its mode is restored afterwards): in train mode BatchNorm would
    normalise with the batch's own statistics, so an image's features would depend on the other
    images of its batch.

    Args:
        backbone: a ResNet (see :func:`resnet_modules`).
        images: float [N,3,H,W], normalised with ImageNet mean/std.
        layers: subset of :data:`LAYERS`.
    Returns:
        name → float [N,C_l,H_l,W_l] for each requested layer.
    """
    m = resnet_modules(backbone)
    unknown = [name for name in layers if name not in LAYERS]
    if unknown:
        raise ValueError(f"layers: expected names from {LAYERS}, got {unknown}")
    deepest = max(LAYERS.index(name) for name in layers)
    out = {}
    with eval_mode(backbone):
        x = m["relu"](m["bn1"](m["conv1"](images)))
        if "conv1" in layers:
            out["conv1"] = x
        x = m["maxpool"](x)
        for name in LAYERS[1:deepest + 1]:
            x = m[name](x)
            if name in layers:
                out[name] = x
    return out


#: The deepest probed layer's stride (layer4 of a ResNet, res5 of a ResNetC4): images fed to the
#: probes must be a whole number of its cells on each side, or the last cell of a layer would cover
#: fewer pixels than :func:`box_average_pool` assumes.
PROBE_STRIDE = 32


def check_probe_size(size: int, what: str):
    """ValueError unless ``size`` (an image side fed to the probes) is a positive multiple of
    :data:`PROBE_STRIDE`."""
    if size <= 0 or size % PROBE_STRIDE:
        raise ValueError(f"{what} must be a positive multiple of {PROBE_STRIDE} (the backbone's stride), "
                         f"got {size}")


def box_average_pool(features: torch.Tensor, boxes: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """Exact area-weighted average of a feature map over boxes given in image pixels.

    Feature cell (i, j) covers image pixels [j·sx, (j+1)·sx) × [i·sy, (i+1)·sy) with sx = W/W_l,
    sy = H/H_l (the layer's stride when the image is a whole number of strides, as
    :func:`check_probe_size` makes the diagnostics' images); its weight is the area it shares with
    the box. Unlike bilinear sampling, a cell that
    does not meet the box has weight exactly 0, so a pointwise network's pooled feature of a box
    depends only on the pixels the box's cells read (what makes CR = 1 testable exactly).

    Args:
        features: float [N,C,H_l,W_l].
        boxes: float [N,M,4], x1,y1,x2,y2 in pixels of the H×W image, non-empty.
        image_size: (H, W) of the image the features were computed from, in pixels.
    Returns:
        float [N,M,C] (dtype of ``features``).
    """
    n, _, h, w = features.shape
    if boxes.dim() != 3 or boxes.shape[0] != n or boxes.shape[2] != 4:
        raise ValueError(f"boxes: expected [N={n},M,4], got {list(boxes.shape)}")
    boxes = boxes.to(device=features.device, dtype=torch.float64)
    sy, sx = image_size[0] / h, image_size[1] / w

    def overlap(lo, hi, cells, scale):
        # [N,M,cells]: length of [lo,hi) ∩ [c·scale, (c+1)·scale), in cell units.
        start = torch.arange(cells, device=features.device, dtype=torch.float64) * scale
        inter = torch.minimum(hi[..., None], start + scale) - torch.maximum(lo[..., None], start)
        return inter.clamp(min=0) / scale

    wy = overlap(boxes[..., 1], boxes[..., 3], h, sy)
    wx = overlap(boxes[..., 0], boxes[..., 2], w, sx)
    norm = wy.sum(-1) * wx.sum(-1)
    if bool((norm <= 0).any()):
        raise ValueError("boxes: every box must have a positive area inside the image")
    pooled = torch.einsum("nchw,nmh,nmw->nmc", features.to(torch.float64), wy, wx) / norm[..., None]
    return pooled.to(features.dtype)


def normalize_images(images: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 RGB [N,H,W,3] → float32 [N,3,H,W] normalised with ImageNet mean/std, on ``device``."""
    x = torch.as_tensor(np.ascontiguousarray(images)).to(device)
    x = x.permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity along the last dimension, in float64 ([..., C] × [..., C] → [...])."""
    a, b = a.double(), b.double()
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=1e-12)


def summarize(values: np.ndarray) -> dict[str, float]:
    """Mean, standard deviation and quartiles of a 1-D sample (NaNs dropped)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"n": 0, "mean": float("nan"), "std": float("nan"), "q25": float("nan"),
                "median": float("nan"), "q75": float("nan")}
    q25, med, q75 = np.percentile(v, [25, 50, 75])
    return {"n": int(v.size), "mean": float(v.mean()), "std": float(v.std()), "q25": float(q25),
            "median": float(med), "q75": float(q75)}


@dataclass(frozen=True)
class GroundTruthObject:
    """One ground-truth object: its image file, its box (x1,y1,x2,y2 in pixels) and its category id."""

    image_path: str
    box: tuple[float, float, float, float]
    category: int
    #: (width, height) of the image as the annotations give it; None when they do not
    image_size: tuple[int, int] | None = None


def load_objects(data_root: str, split: str = "val", min_size: float = 16.0) -> list[GroundTruthObject]:
    """Non-crowd ground-truth objects of a COCO-format dataset, at least ``min_size`` px wide and high.

    The layout is O-KNN's (:func:`~d3ssl.eval.oknn.resolve_split`): ``annotations/instances_<split>.json``
    with the images in ``<split>/``, or COCO 2017's names (split "val" also finds
    ``instances_val2017.json`` and ``val2017/``). Objects come in annotation order, so sampling from
    the list with a seed is reproducible.
    """
    from .oknn import resolve_split
    if not os.path.isdir(data_root):
        raise FileNotFoundError(f"data: dataset folder {data_root!r} does not exist")
    try:
        ann_file, image_dir = resolve_split(data_root, split)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"data: {e}; the diagnostics need COCO-format instance annotations") from None
    with open(ann_file) as f:
        coco = json.load(f)
    for key in ("images", "annotations"):
        if key not in coco:
            raise ValueError(f"data: {ann_file} is not a COCO instances file (no {key!r} entry)")
    files = {img["id"]: os.path.join(image_dir, img["file_name"]) for img in coco["images"]}
    sizes = {img["id"]: annotated_size(img) for img in coco["images"]}
    objects = []
    for ann in coco["annotations"]:
        x, y, w, h = ann["bbox"]
        if ann.get("iscrowd", 0) or w < min_size or h < min_size or ann["image_id"] not in files:
            continue
        objects.append(GroundTruthObject(files[ann["image_id"]], (x, y, x + w, y + h), int(ann["category_id"]),
                                         sizes[ann["image_id"]]))
    if not objects:
        raise ValueError(f"data: {ann_file} has no non-crowd object of at least {min_size} px per side")
    return objects


def read_rgb(path: str, flags: int = cv2.IMREAD_COLOR) -> np.ndarray:
    """uint8 RGB [H,W,3] of an image file (OpenCV's IMREAD_COLOR turns it by its EXIF orientation)."""
    image = cv2.imread(path, flags)
    if image is None:
        raise FileNotFoundError(f"data: cannot read image {path!r}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def annotated_size(image_info: dict) -> tuple[int, int] | None:
    """(width, height) of a COCO ``images`` entry, None when it has none (both are optional here)."""
    w, h = image_info.get("width"), image_info.get("height")
    return (int(w), int(h)) if isinstance(w, (int, float)) and isinstance(h, (int, float)) and w > 0 and h > 0 \
        else None


def stored_size(path: str) -> tuple[int, int]:
    """(width, height) of an image file as stored (before any EXIF turn), from its header."""
    try:
        from PIL import Image
        with Image.open(path) as im:
            return tuple(im.size)
    except Exception:  # noqa: BLE001  (PIL raises many types; OpenCV may still read the file)
        return read_rgb(path, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION).shape[1::-1]


_warned_resized = False


def read_annotated_rgb(path: str, size: tuple[int, int] | None) -> tuple[np.ndarray, tuple[float, float]]:
    """An image whose annotations were made on a (width, height) = ``size`` image: uint8 RGB
    [H,W,3] and the factors (sx, sy) that take the annotations' pixels to the returned image's.

    COCO's boxes are in the pixels as stored in the file, so the stored pixels are returned (an
    EXIF orientation tag is ignored) unless only the image turned by its orientation has the
    annotated size. Annotations of a resized copy (neither has the size) scale the boxes to the
    decode whose aspect ratio is the annotated one's (the stored one when both are), with a
    warning the first time in a process. ``size`` None: the stored pixels, factors 1."""
    global _warned_resized
    stored = read_rgb(path, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if size is None or stored.shape[1::-1] == tuple(size):
        return stored, (1.0, 1.0)
    turned = read_rgb(path)
    if turned.shape[1::-1] == tuple(size):
        return turned, (1.0, 1.0)

    def aspect_error(image):
        h, w = image.shape[:2]
        return abs(math.log((w / h) / (size[0] / size[1])))

    image = min((stored, turned), key=aspect_error)  # min keeps the first (stored) of equals
    h, w = image.shape[:2]
    if not _warned_resized:
        _warned_resized = True
        warnings.warn(f"data: {path!r} is {w}x{h} px but its annotations are for {size[0]}x{size[1]} px; its "
                      "boxes (and those of any other such image, without a further warning) are scaled to "
                      "the image", RuntimeWarning)
    return image, (w / size[0], h / size[1])


def crop_object(obj: GroundTruthObject) -> np.ndarray:
    """uint8 RGB crop [h,w,3] of the object's box (rounded outwards to whole pixels)."""
    image, (sx, sy) = read_annotated_rgb(obj.image_path, obj.image_size)
    x1, y1, x2, y2 = (v * f for v, f in zip(obj.box, (sx, sy, sx, sy)))
    h, w = image.shape[:2]
    x1, y1 = max(0, int(np.floor(x1))), max(0, int(np.floor(y1)))
    x2, y2 = min(w, int(np.ceil(x2))), min(h, int(np.ceil(y2)))
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"data: object box {obj.box} lies outside its image {obj.image_path!r}")
    return image[y1:y2, x1:x2].copy()


def fit_resize(crop: np.ndarray, size: int) -> np.ndarray:
    """Resize a crop, keeping its aspect ratio, so that its longer side is ``size`` pixels."""
    h, w = crop.shape[:2]
    scale = size / max(h, w)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    return cv2.resize(crop, (new_w, new_h), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)

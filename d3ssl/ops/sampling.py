"""The region samplers' geometry after the draw, as ops (csrc/ops/samplers.h): PRC's visiting order
and sequential turns, PRM's mask rectangles, box jitter (RBJ and the baseline's) and the
de-positioning shift, each in one call over the batch on the CPU or one launch on a GPU.

d3ssl.augment.samplers draws the float64 uniforms ``u`` from a generator and calls these; its
``*_reference`` functions compute the same in PyTorch from the same ``u`` and are the tests'
oracle: results are bit-identical (float64 with one rounding per operation, on both devices).

Boxes are float32 [..., 4] (x1, y1, x2, y2) pixels with ``valid`` bool [...]; ``image_size`` is an
int or (H, W).
"""
import numbers

import torch

__all__ = ["prc_plan", "prm_plan", "jitter_plan", "shift_plan", "image_hw", "PRC_MAX_BOXES"]

# Most proposals per image prc_plan takes (kMaxBoxes in csrc/ops/prc.h).
PRC_MAX_BOXES = 32


def image_hw(image_size):
    """(H, W) from an int or an (H, W) pair (Python, NumPy or 0-d torch integers; a pair may be a
    1-D array or tensor of two)."""
    def whole(v):
        if isinstance(v, numbers.Integral) and not isinstance(v, bool):
            return int(v)
        if torch.is_tensor(v) and v.dim() == 0 and not v.is_floating_point() and v.dtype != torch.bool:
            return int(v)
        if getattr(v, "ndim", None) == 0 and getattr(getattr(v, "dtype", None), "kind", None) in ("i", "u"):
            return int(v)  # a 0-d NumPy integer array
        raise ValueError(f"image_size must be an int or an (H, W) pair of ints, got {image_size!r}")
    if isinstance(image_size, (tuple, list, torch.Size)) or getattr(image_size, "ndim", None) == 1:
        if len(image_size) != 2:
            raise ValueError(f"image_size must be an int or an (H, W) pair of ints, got {image_size!r}")
        return whole(image_size[0]), whole(image_size[1])
    n = whole(image_size)
    return n, n


def _size(image_size):
    """[H, W] for the ops' `size` argument; [] for None (no clipping)."""
    return [] if image_size is None else list(image_hw(image_size))


def _range(pair):
    lo, hi = (float(v) for v in pair)
    return lo, hi - lo


def prc_plan(boxes, valid, u, image_size, scale, max_cover):
    """PRC after the draw: boxes [B,K,4] (K <= PRC_MAX_BOXES), valid [B,K], u float64 [B,K,3]
    (target, x, y per proposal, in the boxes' order); image_size None = spans not clipped.
    Returns (rects float32 [B,2K,4], order int64 [B,K]): the proposals are visited from largest to
    smallest pixel area (ties by index; padded and empty ones last), ``order[b, s]`` is the one at
    turn s, slot 2s of rects restores it (active only when more than max_cover of it was erased
    before its turn) and slot 2s+1 is its cutout; inactive slots are (0, 0, 0, 0)."""
    lo, width = _range(scale)
    return torch.ops.d3ssl.prc_plan(boxes, valid, u, _size(image_size), lo, width, float(max_cover))


def prm_plan(boxes, valid, u, image_size, scale, ratio):
    """PRM after the draw: u float64 [...,4] (area fraction, ratio, side, position). Returns (rects
    float32 [...,4], side int64 [...]): one mask rectangle per proposal, outside it against `side`
    (0 top, 1 bottom, 2 left, 3 right), clipped to the image; empty for padded or empty proposals
    and masks wholly outside the image."""
    return torch.ops.d3ssl.prm_plan(boxes, valid, u, _size(image_size), *_range(scale), *_range(ratio))


def jitter_plan(boxes, valid, u, p, shift, scale, image_size=None):
    """Box jitter after the draw: u float64 [...,5] (apply, centre x, centre y, w, h). With
    u[...,0] < p the centre moves by U(shift)·(w, h) and w, h scale by 1 + U(scale); the result is
    clipped to the box itself when image_size is None (RBJ), else to the image (the baseline's
    jitter). Rows padded, not drawn or that would end empty keep their box. Returns (boxes float32
    [...,4], jittered bool [...])."""
    return torch.ops.d3ssl.jitter_plan(boxes, valid, u, _size(image_size), float(p), *_range(shift),
                                       *_range(scale))


def shift_plan(boxes, valid, u, image_size):
    """The de-positioning shift after the draw: boxes [B,K,4], valid [B,K], u float64 [B,2].
    Returns int64 [B,2] (dx, dy): uniform over the integer shifts that keep the bounding box of an
    image's valid boxes inside the image; 0 on an axis without room or without valid boxes."""
    return torch.ops.d3ssl.shift_plan(boxes, valid, u, _size(image_size))


@torch.library.register_fake("d3ssl::prc_plan")
def _prc_plan_fake(boxes, valid, u, size, lo, width, max_cover):
    torch._check(boxes.dim() == 3 and boxes.shape[-1] == 4, lambda: "prc_plan: boxes must be [B,K,4]")
    b, k = boxes.shape[:2]
    return boxes.new_empty((b, 2 * k, 4)), boxes.new_empty((b, k), dtype=torch.int64)


@torch.library.register_fake("d3ssl::prm_plan")
def _prm_plan_fake(boxes, valid, u, size, area_lo, area_width, ratio_lo, ratio_width):
    return boxes.new_empty(boxes.shape), boxes.new_empty(valid.shape, dtype=torch.int64)


@torch.library.register_fake("d3ssl::jitter_plan")
def _jitter_plan_fake(boxes, valid, u, size, p, shift_lo, shift_width, scale_lo, scale_width):
    return boxes.new_empty(boxes.shape), valid.new_empty(valid.shape)


@torch.library.register_fake("d3ssl::shift_plan")
def _shift_plan_fake(boxes, valid, u, size):
    torch._check(boxes.dim() == 3 and boxes.shape[-1] == 4, lambda: "shift_plan: boxes must be [B,K,4]")
    return boxes.new_empty((boxes.shape[0], 2), dtype=torch.int64)

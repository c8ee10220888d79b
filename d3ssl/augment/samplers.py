"""Samplers of the region-level augmentations (the README's *The method*), vectorised over the batch.

Every sampler takes proposals `boxes` float32 [B,K,4] (x1, y1, x2, y2 in pixels of one view) with
`valid` bool [B,K] (False for padding rows), draws from a `torch.Generator`, and returns plain
tensors that say what it chose. Padded rows produce nothing (empty rectangles, unchanged boxes).

Geometry follows the ops' pixel rule: pixel (x, y) belongs to a rectangle when its centre
(x + 0.5, y + 0.5) lies in [x1, x2) x [y1, y2). A proposal's pixels are therefore the integer span
[ceil(x1 - 0.5), ceil(x2 - 0.5)) on each axis, and every rectangle a sampler emits has integer
corners, so the op covers exactly the pixels the sampler reasoned about.

Rectangle operations come padded per image: rects float32 [B,N,4], erase bool [B,N]; an inactive
slot is the empty rectangle (0, 0, 0, 0). `RegionOps.csr()` gives the ops' CSR form.

After the draw, each sampler's geometry runs as one op (d3ssl.ops.sampling: one call on the CPU, one
launch on a GPU) for float32 boxes on the CPU or a GPU; the ``*_reference`` functions here compute
the same in PyTorch from the same draws (the ops' oracle, and the path for other dtypes or devices).

Reproducibility: the random numbers are drawn in one call per sampler, as float64 U[0,1), on the
generator's own device, and moved to the boxes' device (pinned, non-blocking, when the generator is
on the CPU and the boxes on a GPU). The geometry after the draw is exact in float64 on both
devices, so a CPU generator gives the same rectangles for CPU and CUDA boxes. A CUDA generator
draws on the GPU (no host traffic): reproducible on that device, but a different stream of numbers.

No sampler waits for the GPU: the small constants they need (image bounds, PRC's restore/erase
pattern) are made once per device and reused (:func:`_constant`), because a tensor made from Python
numbers on a GPU is a blocking copy that first waits for all work queued on the stream, and the
trainer runs the next step's stage while the current step still computes.
"""
import functools
from typing import NamedTuple

import torch
from torch import Tensor

from ..ops.sampling import PRC_MAX_BOXES, image_hw, jitter_plan, prc_plan, prm_plan, shift_plan

__all__ = ["RegionOps", "PRC", "PRM", "RBJ", "Shift", "sample_prc", "sample_prm", "sample_rbj", "sample_rbj_views",
           "sample_shift", "sample_subset", "sample_background", "sample_soco_jitter", "sample_soco_cutout",
           "box_ops", "concat_ops", "pixel_spans", "prc_reference", "prc_rects_reference", "prm_reference",
           "jitter_reference", "shift_reference"]

# PRM's sides, in the order of the `side` codes.
PRM_SIDES = ("top", "bottom", "left", "right")


class RegionOps(NamedTuple):
    """Ordered rectangle operations per image, padded: rects float32 [B,N,4] (integer-valued
    pixels, inactive slots empty), erase bool [B,N] (True erases / cuts a hole, False restores)."""
    rects: Tensor
    erase: Tensor

    def csr(self):
        """(rects [B*N,4], erase [B*N], offsets int64 [B+1]) for the ops."""
        b, n = self.erase.shape
        offsets = torch.arange(b + 1, device=self.rects.device, dtype=torch.int64) * n
        return self.rects.reshape(b * n, 4), self.erase.reshape(b * n), offsets


class PRC(NamedTuple):
    """Proposal-based random cutout of a batch.

    rects float32 [B,2K,4], erase bool [B,2K]: turn s owns slots 2s (restore the proposal, active
    only when more than max_cover of it was erased before its turn) and 2s+1 (its cutout, erase).
    order int64 [B,K]: the proposal visited at turn s, largest first; padded and empty ones last.
    """
    rects: Tensor
    erase: Tensor
    order: Tensor

    def ops(self) -> RegionOps:
        return RegionOps(self.rects, self.erase)


class PRM(NamedTuple):
    """Proposal-based random mask: rects float32 [B,K,4], one erase rectangle per proposal, outside
    it against side[b,k] (0 top, 1 bottom, 2 left, 3 right, see PRM_SIDES), clipped to the image;
    empty for padded proposals or when the mask falls wholly outside the image."""
    rects: Tensor
    side: Tensor

    def ops(self) -> RegionOps:
        return RegionOps(self.rects, torch.ones(self.rects.shape[:2], dtype=torch.bool,
                                                device=self.rects.device))


class RBJ(NamedTuple):
    """Jittered boxes float32 [B,K,4] and which rows were jittered, bool [B,K]."""
    boxes: Tensor
    jittered: Tensor


class Shift(NamedTuple):
    """De-positioning shift int64 [B,2] (dx, dy) in pixels, one per image."""
    shift: Tensor


_size = image_hw  # (H, W) from an int or a pair


def _check(boxes, valid, name):
    if boxes.dim() != 3 or boxes.shape[-1] != 4 or not boxes.is_floating_point():
        raise ValueError(f"{name}: boxes must be float [B,K,4] (x1,y1,x2,y2 pixels), got "
                         f"{boxes.dtype} {tuple(boxes.shape)}")
    if valid.dtype != torch.bool or tuple(valid.shape) != tuple(boxes.shape[:2]):
        raise ValueError(f"{name}: valid must be bool [B,K] = {tuple(boxes.shape[:2])}, got "
                         f"{valid.dtype} {tuple(valid.shape)}")
    if valid.device != boxes.device:
        raise ValueError(f"{name}: valid is on {valid.device} but boxes on {boxes.device}")


@functools.lru_cache(maxsize=256)
def _cached_constant(values: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


def _constant(values, dtype, device) -> Tensor:
    """The tensor of `values` (a flat sequence of Python numbers) on `device`, made once per
    (values, dtype, device) and shared: callers must not modify it in place."""
    return _cached_constant(tuple(values), dtype, torch.device(device))


def _use_op(boxes):
    """Whether the sampling ops take these boxes (float32 on the CPU or a GPU); else the reference."""
    return boxes.dtype == torch.float32 and boxes.device.type in ("cpu", "cuda")


def _uniform(shape, generator, device):
    """float64 U[0,1) of `shape`, drawn on the generator's device, returned on `device`."""
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    device = torch.device(device)
    if generator.device.type == "cpu" and device.type != "cpu":
        u = torch.rand(shape, generator=generator, dtype=torch.float64,
                       pin_memory=device.type == "cuda")
        return u.to(device, non_blocking=True)
    return torch.rand(shape, generator=generator, dtype=torch.float64,
                      device=generator.device).to(device)


def _lerp(range_, u):
    lo, hi = range_
    return lo + (hi - lo) * u


def pixel_spans(boxes, image_size=None):
    """Pixel spans of boxes under the pixel rule: float64 (x0, y0, x1, y1) [...,4], integer-valued;
    the box covers columns x0..x1-1 and rows y0..y1-1. Clipped to the image when its size is given.
    """
    s = torch.ceil(boxes.double() - 0.5)
    if image_size is not None:
        h, w = _size(image_size)
        s = torch.minimum(s.clamp(min=0), _constant((w, h, w, h), s.dtype, s.device))
    x0, y0, x1, y1 = s.unbind(-1)
    return torch.stack([x0, y0, torch.maximum(x1, x0), torch.maximum(y1, y0)], -1)


def _erased_fraction(span, rects, erase):
    """Exact fraction of the pixels of `span` (float64 [B,4] pixel span) that end erased after
    replaying the ops rects float64 [B,M,4] (integer pixel spans) with erase bool [M], in order.

    The ops' edges, clamped to the span, cut it into at most (2M+1)^2 cells whose pixels share
    their state under every op; the state is replayed per cell and weighted by the cell's area.
    """
    bsz, m = rects.shape[:2]
    area = (span[:, 2] - span[:, 0]) * (span[:, 3] - span[:, 1])
    if m == 0:
        return torch.zeros_like(area)

    def cells(lo, hi, a, b):  # lo, hi [B]; a, b [B,M] -> left edges [B,2M+1], widths
        e = torch.cat([lo[:, None], hi[:, None], torch.minimum(torch.maximum(a, lo[:, None]), hi[:, None]),
                       torch.minimum(torch.maximum(b, lo[:, None]), hi[:, None])], 1).sort(1).values
        return e[:, :-1], e[:, 1:] - e[:, :-1]

    xl, wx = cells(span[:, 0], span[:, 2], rects[..., 0], rects[..., 2])
    yl, wy = cells(span[:, 1], span[:, 3], rects[..., 1], rects[..., 3])
    cov_x = (rects[..., 0, None] <= xl[:, None]) & (xl[:, None] < rects[..., 2, None])  # [B,M,I]
    cov_y = (rects[..., 1, None] <= yl[:, None]) & (yl[:, None] < rects[..., 3, None])  # [B,M,J]
    state = torch.zeros(bsz, xl.shape[1], yl.shape[1], dtype=torch.bool, device=span.device)
    for j in range(m):
        cov = cov_x[:, j, :, None] & cov_y[:, j, None, :]
        state = torch.where(cov, erase[j], state) if erase.dim() == 1 else \
            torch.where(cov, erase[:, j, None, None], state)
    erased = (state * wx[:, :, None] * wy[:, None, :]).sum((1, 2))
    return torch.where(area > 0, erased / area.clamp(min=1), torch.zeros_like(area))


def sample_prc(boxes, valid, generator, scale=(0.2, 0.5), max_cover=0.5, image_size=None) -> PRC:
    """Proposal-based random cutout (the README's *The method*), as ordered restore/erase operations per image.

    boxes float32 [B,K,4] pixels, valid bool [B,K]. Per image, proposals are visited from largest to
    smallest (pixel area; ties by index). For proposal j: target a ~ U(scale); c = exact fraction of
    j's pixels erased by the operations so far; if c > max_cover, j is restored first (c = 0); if
    a > c, one rectangle with j's aspect ratio and (a - c)|j| pixels, rounded down to whole pixels,
    is erased at a uniformly drawn integer position inside j. So at its turn no proposal ends more
    than max(a, c) <= max_cover erased. image_size (int or (H, W)): clips proposals to the image,
    as the op will. Draws B*K*3 uniforms (target, x, y per proposal).
    """
    _check(boxes, valid, "sample_prc")
    bsz, k = valid.shape
    u = _uniform((bsz, k, 3), generator, boxes.device)
    if _use_op(boxes) and k <= PRC_MAX_BOXES:
        rects, order = prc_plan(boxes, valid, u, image_size, scale, max_cover)
    else:
        rects, order = prc_reference(boxes, valid, u, image_size, scale, max_cover)
    erase = _constant((False, True) * k, torch.bool, boxes.device)
    return PRC(rects, erase.expand(bsz, -1).clone(memory_format=torch.contiguous_format), order)


def prc_reference(boxes, valid, u, image_size, scale, max_cover):
    """sample_prc after the draw in PyTorch, from the uniforms u float64 [B,K,3] (target, x, y in
    the boxes' order): the oracle of d3ssl.ops.sampling.prc_plan. Returns (rects float32 [B,2K,4],
    order int64 [B,K])."""
    span = pixel_spans(boxes, image_size)
    pw, ph = span[..., 2] - span[..., 0], span[..., 3] - span[..., 1]
    live = valid & (pw > 0) & (ph > 0) & torch.isfinite(pw * ph)  # infinite only without clipping
    order = torch.sort(torch.where(live, pw * ph, torch.full_like(pw, -1.0)), dim=1,
                       descending=True, stable=True).indices
    span = span.gather(1, order[..., None].expand(-1, -1, 4))
    u = u.gather(1, order[..., None].expand(-1, -1, 3))
    live = live.gather(1, order)
    return prc_rects_reference(span, u, live, scale, max_cover).float(), order


def prc_rects_reference(span, u, live, scale, max_cover):
    """PRC's sequential turns in PyTorch, one batch-wide step per turn (csrc/ops/prc.h's
    plan_image is the same in C++), after the visiting order is fixed.

    span float64 [B,K,4] pixel spans in visiting order, u float64 [B,K,3], live bool [B,K].
    Returns float64 [B,2K,4]."""
    bsz, k = live.shape
    device = span.device
    pw, ph = span[..., 2] - span[..., 0], span[..., 3] - span[..., 1]
    rects = torch.zeros(bsz, 2 * k, 4, dtype=torch.float64, device=device)
    erase = _constant((False, True) * k, torch.bool, device)
    zero = torch.zeros(bsz, 4, dtype=torch.float64, device=device)
    for s in range(k):
        box = span[:, s]
        c = _erased_fraction(box, rects[:, :2 * s], erase[:2 * s])
        restore = live[:, s] & (c > max_cover)
        rects[:, 2 * s] = torch.where(restore[:, None], box, zero)
        c = torch.where(restore, torch.zeros_like(c), c)
        a = _lerp(scale, u[:, s, 0])
        side = torch.sqrt((a - c).clamp(min=0))  # both sides scale by sqrt of the area fraction
        w, h = torch.floor(pw[:, s] * side), torch.floor(ph[:, s] * side)
        x0 = box[:, 0] + torch.floor(u[:, s, 1] * (pw[:, s] - w + 1)).clamp(max=pw[:, s] - w)
        y0 = box[:, 1] + torch.floor(u[:, s, 2] * (ph[:, s] - h + 1)).clamp(max=ph[:, s] - h)
        cut = live[:, s] & (a > c) & (w >= 1) & (h >= 1)
        rects[:, 2 * s + 1] = torch.where(cut[:, None], torch.stack([x0, y0, x0 + w, y0 + h], 1), zero)
    return rects


def sample_prm(boxes, valid, image_size, generator, scale=(0.2, 0.6), ratio=(3 / 4, 4 / 3)) -> PRM:
    """Proposal-based random mask (the README's *The method*): one erase rectangle per proposal.

    boxes float32 [B,K,4] pixels, valid bool [B,K], image_size int or (H, W). Per proposal: area
    fraction f ~ U(scale) of the proposal's pixels, aspect ratio w/h ~ U(ratio), both sides rounded
    to whole pixels (at least 1); a side drawn uniformly from top, bottom, left, right; the rectangle
    lies outside the proposal against that side, its centre at a uniformly drawn pixel along the
    side; then clipped to the image. Draws B*K*4 uniforms (f, ratio, side, position).
    """
    _check(boxes, valid, "sample_prm")
    u = _uniform((*valid.shape, 4), generator, boxes.device)
    if _use_op(boxes):
        return PRM(*prm_plan(boxes, valid, u, image_size, scale, ratio))
    return PRM(*prm_reference(boxes, valid, u, image_size, scale, ratio))


def prm_reference(boxes, valid, u, image_size, scale=(0.2, 0.6), ratio=(3 / 4, 4 / 3)):
    """sample_prm after the draw in PyTorch, from u float64 [B,K,4] (area, ratio, side, position):
    the oracle of d3ssl.ops.sampling.prm_plan. Returns (rects float32 [B,K,4], side int64 [B,K])."""
    h_img, w_img = _size(image_size)
    span = pixel_spans(boxes, image_size)
    x0, y0, x1, y1 = span.unbind(-1)
    pw, ph = x1 - x0, y1 - y0
    live = valid & (pw > 0) & (ph > 0)
    area = _lerp(scale, u[..., 0]) * pw * ph
    r = _lerp(ratio, u[..., 1])
    w = torch.round(torch.sqrt(area * r)).clamp(min=1)
    h = torch.round(torch.sqrt(area / r)).clamp(min=1)
    side = torch.floor(u[..., 2] * 4).clamp(max=3).long()
    along_x = x0 + torch.floor(u[..., 3] * pw).clamp(max=pw - 1) - torch.floor(w / 2)
    along_y = y0 + torch.floor(u[..., 3] * ph).clamp(max=ph - 1) - torch.floor(h / 2)
    mx0 = torch.stack([along_x, along_x, x0 - w, x1], -1).gather(-1, side[..., None])[..., 0]
    my0 = torch.stack([y0 - h, y1, along_y, along_y], -1).gather(-1, side[..., None])[..., 0]
    rect = torch.stack([mx0, my0, mx0 + w, my0 + h], -1)
    rect = torch.minimum(rect.clamp(min=0), _constant((w_img, h_img, w_img, h_img), rect.dtype, rect.device))
    keep = live & (rect[..., 2] > rect[..., 0]) & (rect[..., 3] > rect[..., 1])
    rect = torch.where(keep[..., None], rect, torch.zeros_like(rect))
    return rect.float(), side


def _jitter(boxes, valid, u, p, shift, scale, image_size=None):
    """Box jitter from uniforms u [...,5] (apply, cx, cy, w, h), by the op or its reference."""
    if _use_op(boxes):
        return RBJ(*jitter_plan(boxes, valid, u, p, shift, scale, image_size))
    return RBJ(*jitter_reference(boxes, valid, u, p, shift, scale, image_size))


def jitter_reference(boxes, valid, u, p, shift, scale, image_size=None):
    """Box jitter in PyTorch from uniforms u float64 [...,5] (apply, cx, cy, w, h), the oracle of
    d3ssl.ops.sampling.jitter_plan: with probability p, move the centre by U(shift)*(w,h) and scale
    w, h by 1 + U(scale); clip to the box itself (image_size None, RBJ) or to the image. Rows that
    are padded, not drawn, or would end empty keep the input box. Returns (boxes, jittered)."""
    if image_size is None:
        lo = torch.cat([boxes[..., :2], boxes[..., :2]], -1)
        hi = torch.cat([boxes[..., 2:], boxes[..., 2:]], -1)
    else:
        h_img, w_img = _size(image_size)
        lo = torch.zeros_like(boxes)
        hi = _constant((w_img, h_img, w_img, h_img), boxes.dtype, boxes.device).expand_as(boxes)
    b = boxes.double()
    w, h = b[..., 2] - b[..., 0], b[..., 3] - b[..., 1]
    cx = (b[..., 0] + b[..., 2]) / 2 + _lerp(shift, u[..., 1]) * w
    cy = (b[..., 1] + b[..., 3]) / 2 + _lerp(shift, u[..., 2]) * h
    nw, nh = w * (1 + _lerp(scale, u[..., 3])), h * (1 + _lerp(scale, u[..., 4]))
    new = torch.stack([cx - nw / 2, cy - nh / 2, cx + nw / 2, cy + nh / 2], -1).to(boxes.dtype)
    new = torch.minimum(torch.maximum(new, lo), hi) + 0.0  # + 0: a clamp's tie of -0 and +0 gives +0
    jittered = valid & (u[..., 0] < p) & (new[..., 2] > new[..., 0]) & (new[..., 3] > new[..., 1])
    return torch.where(jittered[..., None], new, boxes), jittered


def sample_rbj(boxes, valid, generator, p=0.5, ratio=0.1) -> RBJ:
    """Restricted box jitter (the README's *The method*): with probability p per box, shift the centre by
    U(-ratio, ratio)*(w, h) and scale w and h by 1 + U(-ratio, 0) each, then clip to the original box;
    a jittered box never extends past the proposal and is never empty. Pixels, float32 [B,K,4].
    Draws B*K*5 uniforms (apply, centre x, centre y, w, h)."""
    _check(boxes, valid, "sample_rbj")
    return sample_rbj_views([boxes], valid, generator, p, ratio)[0]


def sample_rbj_views(boxes, valid, generator, p=0.5, ratio=0.1) -> list:
    """sample_rbj for the boxes of several views of the same proposals in one pass: boxes a
    sequence of V float32 [B,K,4] (one per view), valid bool [B,K]. Returns V RBJ, in order. Draws
    V*B*K*5 uniforms at once, in the order of V sample_rbj calls: with a CPU generator the result is
    bit-identical to those calls (a CUDA generator's stream depends on how it is split)."""
    boxes = list(boxes)
    if not boxes:
        return []
    for b in boxes:
        _check(b, valid, "sample_rbj_views")
    stacked = torch.stack(boxes)
    u = _uniform((len(boxes), *valid.shape, 5), generator, stacked.device)
    out = _jitter(stacked, valid.expand(len(boxes), -1, -1), u, p, (-ratio, ratio), (-ratio, 0.0))
    return [RBJ(b, j) for b, j in zip(out.boxes.unbind(0), out.jittered.unbind(0))]


def sample_soco_jitter(boxes, valid, image_size, generator, p=0.5, ratio=0.1) -> RBJ:
    """SoCo's box jitter (the baseline): with probability p per box, shift the centre by
    U(-ratio, ratio)*(w, h) and scale w and h by 1 + U(-ratio, ratio) each, clipped to the view
    (not to the box); never empty. Draws B*K*5 uniforms."""
    _check(boxes, valid, "sample_soco_jitter")
    u = _uniform((*valid.shape, 5), generator, boxes.device)
    return _jitter(boxes, valid, u, p, (-ratio, ratio), (-ratio, ratio), image_size)


def sample_soco_cutout(boxes, valid, generator, scale=(0.2, 0.5), ratio=(3 / 4, 4 / 3),
                       image_size=None) -> RegionOps:
    """SoCo-style in-box cutout (the baseline): per proposal one erase rectangle of area fraction
    U(scale) of the box and aspect ratio w/h ~ U(ratio), sides rounded to whole pixels and capped by
    the box, placed at a uniformly drawn integer position inside the box. [B,K] ops.
    Draws B*K*4 uniforms (area, ratio, x, y)."""
    _check(boxes, valid, "sample_soco_cutout")
    u = _uniform((*valid.shape, 4), generator, boxes.device)
    span = pixel_spans(boxes, image_size)
    pw, ph = span[..., 2] - span[..., 0], span[..., 3] - span[..., 1]
    live = valid & (pw > 0) & (ph > 0)
    area = _lerp(scale, u[..., 0]) * pw * ph
    r = _lerp(ratio, u[..., 1])
    w = torch.minimum(torch.round(torch.sqrt(area * r)).clamp(min=1), pw)
    h = torch.minimum(torch.round(torch.sqrt(area / r)).clamp(min=1), ph)
    x0 = span[..., 0] + torch.floor(u[..., 2] * (pw - w + 1)).clamp(max=pw - w)
    y0 = span[..., 1] + torch.floor(u[..., 3] * (ph - h + 1)).clamp(max=ph - h)
    rect = torch.stack([x0, y0, x0 + w, y0 + h], -1)
    rect = torch.where(live[..., None], rect, torch.zeros_like(rect))
    return RegionOps(rect.float(), torch.ones_like(valid))


def sample_shift(boxes, valid, image_size, generator) -> Shift:
    """De-positioning shift: per image one integer (dx, dy), uniform over the integer shifts that
    keep the bounding box of its valid boxes inside the image [0,W]x[0,H]; (0, 0) for an image
    without valid boxes or without room (or with non-finite boxes). Draws B*2 uniforms."""
    _check(boxes, valid, "sample_shift")
    u = _uniform((valid.shape[0], 2), generator, boxes.device)
    if _use_op(boxes):
        return Shift(shift_plan(boxes, valid, u, image_size))
    return Shift(shift_reference(boxes, valid, u, image_size))


def shift_reference(boxes, valid, u, image_size):
    """sample_shift after the draw in PyTorch, from u float64 [B,2]: the oracle of
    d3ssl.ops.sampling.shift_plan. Returns int64 [B,2]."""
    h_img, w_img = _size(image_size)
    if boxes.shape[1] == 0:
        return torch.zeros(boxes.shape[0], 2, dtype=torch.int64, device=boxes.device)
    b = boxes.double()
    inf = torch.full_like(b[..., 0], float("inf"))
    lo_xy = torch.stack([torch.where(valid, b[..., 0], inf).amin(1),
                         torch.where(valid, b[..., 1], inf).amin(1)], 1)
    hi_xy = torch.stack([torch.where(valid, b[..., 2], -inf).amax(1),
                         torch.where(valid, b[..., 3], -inf).amax(1)], 1)
    lo = torch.ceil(-lo_xy)                                            # smallest shift
    hi = torch.floor(_constant((w_img, h_img), b.dtype, b.device) - hi_xy)  # largest shift
    room = valid.any(1, keepdim=True) & (lo <= hi) & (lo > -float("inf")) & (hi < float("inf"))
    lo = torch.where(room, lo, torch.zeros_like(lo))
    hi = torch.where(room, hi, torch.zeros_like(hi))
    return (lo + torch.minimum(torch.floor(u * (hi - lo + 1)), hi - lo)).long()


def sample_subset(valid, n, generator) -> torch.Tensor:
    """bool [B,K]: per image, min(n, its valid count) of its valid boxes, chosen uniformly without
    replacement (the boxes of the de-positioning view when it takes a subset). Draws B*K uniforms."""
    if valid.dim() != 2 or valid.dtype != torch.bool:
        raise ValueError(f"sample_subset: valid must be bool [B,K], got {valid.dtype} {tuple(valid.shape)}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"sample_subset: n must be an int >= 1, got {n!r}")
    u = _uniform(tuple(valid.shape), generator, valid.device)
    keys = torch.where(valid, u, torch.full_like(u, 2.0))           # invalid boxes sort last
    rank = keys.argsort(dim=1, stable=True).argsort(dim=1)
    return valid & (rank < n)


def sample_background(batch_size, generator, device):
    """bg_index int64 [B]: a derangement of the batch, (i + k) mod B with k ~ U{1..B-1}, so no image
    is its own background. With B = 1 there is no other image: the image is its own background.
    Draws one uniform."""
    u = _uniform((1,), generator, device)
    k = 1 + torch.floor(u * max(batch_size - 1, 0)).clamp(max=max(batch_size - 2, 0)).long()
    idx = torch.arange(batch_size, device=device)
    return (idx + k) % batch_size if batch_size > 1 else idx


def box_ops(boxes, valid, erase):
    """One op per box (padded boxes become empty rectangles): the de-positioning mask's set ops
    (erase=False) or a plain box cutout (erase=True). [B,K] ops."""
    rects = torch.where(valid[..., None], boxes.float(), torch.zeros_like(boxes, dtype=torch.float32))
    return RegionOps(rects, torch.full(valid.shape, bool(erase), device=valid.device))


def concat_ops(*ops: RegionOps) -> RegionOps:
    """The ops of each argument one after the other, per image."""
    return RegionOps(torch.cat([o.rects for o in ops], 1), torch.cat([o.erase for o in ops], 1))

"""The region stage: what training calls once per step to turn a Batch into the student and teacher
inputs (the README's *The method*). Everything runs on the batch's device, vectorised over the batch: the
samplers draw the rectangles, one fused region_erase per student view applies PRC then PRM, and
one fused composite builds the de-positioning view.

Random numbers are drawn from `generator` in a fixed order (below), so a seed reproduces a step.
A CPU generator with a GPU batch reproduces the CPU result exactly (see d3ssl.augment.samplers).
Draw order of region_stage: PRC x1, PRM x1, PRC x2s, PRM x2s, x3's subset of boxes (only with
dp_boxes > 0), shift, background, PRC x3, RBJ of x1_hat, x2s_hat, x3, x1, x2 (disabled parts draw
nothing).
"""
from dataclasses import dataclass

import torch
from torch import Tensor

from ..data.batch import Batch
from ..ops.region import composite, region_erase
from . import samplers as S

__all__ = ["RegionConfig", "SocoAugConfig", "RegionViews", "RegionStage", "region_stage", "soco_stage"]


@dataclass
class RegionConfig:
    """D3SSL's region-level augmentations; the defaults are the paper's."""
    prc: bool = True                 # proposal-based random cutout on x̂1, x̂2s
    prm: bool = True                 # proposal-based random mask on x̂1, x̂2s
    rbj: bool = True                 # restricted box jitter, per view
    depositioning: bool = True       # build x3 (the de-positioning view)
    # Boxes pasted into x3, per image: 0 = all valid boxes (our reading of the paper); n > 0 = n of
    # them drawn at random. The shift keeps the union of x3's boxes inside the view, so with many
    # large proposals whose union covers nearly the whole view the shift is a few pixels and x3
    # hardly moves anything; a subset leaves room to move it (README, Status).
    dp_boxes: int = 0
    prc_scale: tuple = (0.2, 0.5)    # PRC target erased fraction of a proposal
    max_cover: float = 0.5           # PRC: more than this erased before a proposal's turn restores it
    prm_scale: tuple = (0.2, 0.6)    # PRM mask area as a fraction of the proposal
    prm_ratio: tuple = (3 / 4, 4 / 3)  # PRM mask aspect ratio w/h
    rbj_p: float = 0.5               # RBJ probability per box and view
    rbj_ratio: float = 0.1           # RBJ centre shift range (fraction of w, h) and shrink range
    fill: float = 0.0                # value written into erased pixels (0 = mean colour of normalised views)

    def __post_init__(self):
        if isinstance(self.dp_boxes, bool) or not isinstance(self.dp_boxes, int) or self.dp_boxes < 0:
            raise ValueError(f"RegionConfig.dp_boxes must be an int >= 0 (0 = all boxes), got {self.dp_boxes!r}")


@dataclass
class SocoAugConfig:
    """The baseline's (SoCo's) region-level augmentation: box jitter on the student views' boxes and
    one in-box cutout per proposal; no de-positioning view. Defaults as in SoCo."""
    jitter: bool = True              # box jitter on the student views' boxes
    jitter_p: float = 0.5            # probability per box
    jitter_ratio: float = 0.1        # centre shift U(-r,r)*(w,h), scale 1+U(-r,r); clipped to the view
    cutout: bool = True              # one cutout inside each proposal of the student views
    cutout_scale: tuple = (0.2, 0.5)  # cutout area as a fraction of the box
    cutout_ratio: tuple = (3 / 4, 4 / 3)  # cutout aspect ratio w/h
    fill: float = 0.0                # value of cut-out pixels (0 = mean colour of normalised views)


@dataclass
class RegionViews:
    """Student and teacher inputs of one step. Views [B,3,S,S] (x2s_hat [B,3,S/2,S/2]) in the batch's
    dtype and memory format; boxes float32 [B,K,4] in the pixels of their own view."""
    x1_hat: Tensor           # PRM∘PRC(view1)                 (student)
    x2s_hat: Tensor          # PRM∘PRC(view2_small)           (student)
    x3: Tensor | None        # de-positioning composite       (student); None when switched off
    x1: Tensor               # view1 unchanged                (teacher)
    x2: Tensor               # view2 unchanged                (teacher)
    boxes_x1_hat: Tensor
    boxes_x2s_hat: Tensor
    boxes_x3: Tensor | None  # boxes2 + t (then RBJ); None when de-positioning is off
    boxes_x1: Tensor
    boxes_x2: Tensor
    valid: Tensor            # bool [B,K]
    valid_x3: Tensor | None = None  # bool [B,K]: the boxes of x3 (a subset of valid); None = valid


def _erase(view, ops, fill):
    if ops is None:
        return view
    rects, erase, offsets = ops.csr()
    return region_erase(view, rects, erase, offsets, fill)


def _prc_prm_ops(boxes, valid, size, generator, cfg):
    """PRC ops followed by PRM ops per image (None when both are off)."""
    parts = []
    if cfg.prc:
        parts.append(S.sample_prc(boxes, valid, generator, cfg.prc_scale, cfg.max_cover, size).ops())
    if cfg.prm:
        parts.append(S.sample_prm(boxes, valid, size, generator, cfg.prm_scale, cfg.prm_ratio).ops())
    return S.concat_ops(*parts) if parts else None


def region_stage(batch: Batch, generator: torch.Generator, cfg: RegionConfig = RegionConfig()) -> RegionViews:
    """D3SSL's region stage: x̂1 = PRM∘PRC(x1), x̂2s = PRM∘PRC(x2s) with independent draws, x3 = the
    de-positioning composite, and every view's boxes (RBJ drawn independently per view).

    x3: shift t per image keeping the union of x3's boxes inside the view; mask = union of the
    shifted boxes minus PRC holes cut with the shifted boxes; where the mask is set x3 shows view2
    moved by t, elsewhere view2 of another image of the batch (a derangement; with B = 1 the image
    itself). x3's boxes are view 2's valid boxes, or `cfg.dp_boxes` of them drawn per image
    (``valid_x3``). Boxes of x3 = boxes2 + t; with dp_boxes > 0 the rows left out of x3 repeat one
    of its boxes.

    Every call returns fresh tensors. On the CPU those of 1 MiB or more come from the op library's
    cache of freed outputs (d3ssl.ops.region), so a loop that drops each step's views reuses memory
    that is already mapped (huge pages) instead of page-faulting new memory on every step.
    """
    view1, view2, small = batch.view1, batch.view2, batch.view2_small
    valid = batch.box_valid
    s1, s2 = view1.shape[-1], small.shape[-1]
    boxes1, boxes2 = batch.boxes1, batch.boxes2
    boxes2s = boxes2 / 2

    ops1 = _prc_prm_ops(boxes1, valid, s1, generator, cfg)
    x1_hat = _erase(view1, ops1, cfg.fill)
    ops2s = _prc_prm_ops(boxes2s, valid, s2, generator, cfg)
    x2s_hat = _erase(small, ops2s, cfg.fill)

    x3 = boxes3 = valid3 = None
    if cfg.depositioning:
        valid3 = S.sample_subset(valid, cfg.dp_boxes, generator) if cfg.dp_boxes > 0 else valid
        t = S.sample_shift(boxes2, valid3, view2.shape[-2:], generator).shift
        bg_index = S.sample_background(view2.shape[0], generator, view2.device)
        boxes3 = boxes2 + t[:, None, :].repeat(1, 1, 2).float()
        if cfg.dp_boxes > 0:
            # Boxes left out of x3 repeat one that is in it (as the loaders pad): the student still
            # pools every row, and rows of moved-away boxes would feed BatchNorm with regions that are
            # partly outside the view or show only another image.
            first = valid3.int().argmax(dim=1)
            kept = boxes3[torch.arange(len(first), device=first.device), first][:, None]
            boxes3 = torch.where(valid3[..., None], boxes3, kept)
        ops = S.box_ops(boxes3, valid3, erase=False)  # the mask: union of the shifted boxes
        if cfg.prc:  # holes cut into it; a restore sets the proposal again
            prc = S.sample_prc(boxes3, valid3, generator, cfg.prc_scale, cfg.max_cover, view2.shape[-2:])
            ops = S.concat_ops(ops, prc.ops())
        x3 = composite(view2, view2, bg_index, t, *ops.csr())

    # RBJ, drawn independently per view, in one pass (in the draw order of the module docstring)
    per_view = [boxes1, boxes2s] + ([boxes3] if boxes3 is not None else []) + [boxes1, boxes2]
    if cfg.rbj:
        per_view = [r.boxes for r in S.sample_rbj_views(per_view, valid, generator, cfg.rbj_p, cfg.rbj_ratio)]
    b1_hat, b2s_hat = per_view[:2]
    b3 = per_view[2] if boxes3 is not None else None
    b1, b2 = per_view[-2:]

    return RegionViews(
        x1_hat=x1_hat, x2s_hat=x2s_hat, x3=x3, x1=view1, x2=view2,
        boxes_x1_hat=b1_hat, boxes_x2s_hat=b2s_hat, boxes_x3=b3,
        boxes_x1=b1, boxes_x2=b2, valid=valid, valid_x3=valid3)


class RegionStage:
    """:func:`region_stage` with its config bound: ``RegionStage(cfg)(batch, generator)`` is
    ``region_stage(batch, generator, cfg)``, the object the trainer makes once per loop.

        stage = RegionStage(cfg.region)
        for batch in loader:
            views = stage(batch, generator)

    It keeps no buffers of its own: on the CPU the ops' cache of freed outputs already reuses the
    memory of earlier steps' views, for every caller (see region_stage).
    """

    def __init__(self, cfg: RegionConfig = RegionConfig()):
        self.cfg = cfg

    def __call__(self, batch: Batch, generator: torch.Generator) -> RegionViews:
        return region_stage(batch, generator, self.cfg)


def soco_stage(batch: Batch, generator: torch.Generator, cfg: SocoAugConfig = SocoAugConfig()) -> RegionViews:
    """The baseline's region stage (SoCo): the student views x̂1, x̂2s get one in-box cutout per
    proposal and SoCo's box jitter on their boxes (clipped to the view, not to the box); the teacher
    views x1, x2 and their boxes are unchanged; no de-positioning view (x3 = boxes_x3 = None).
    Draw order: cutout x1, cutout x2s, jitter x1_hat, jitter x2s_hat."""
    view1, small = batch.view1, batch.view2_small
    valid = batch.box_valid
    boxes1, boxes2s = batch.boxes1, batch.boxes2 / 2
    s1, s2 = view1.shape[-1], small.shape[-1]
    x1_hat, x2s_hat = view1, small
    if cfg.cutout:
        x1_hat = _erase(view1, S.sample_soco_cutout(boxes1, valid, generator, cfg.cutout_scale,
                                                    cfg.cutout_ratio, s1), cfg.fill)
        x2s_hat = _erase(small, S.sample_soco_cutout(boxes2s, valid, generator, cfg.cutout_scale,
                                                     cfg.cutout_ratio, s2), cfg.fill)

    def jitter(boxes, size):
        if not cfg.jitter:
            return boxes
        return S.sample_soco_jitter(boxes, valid, size, generator, cfg.jitter_p, cfg.jitter_ratio).boxes

    return RegionViews(
        x1_hat=x1_hat, x2s_hat=x2s_hat, x3=None, x1=view1, x2=batch.view2,
        boxes_x1_hat=jitter(boxes1, s1), boxes_x2s_hat=jitter(boxes2s, s2), boxes_x3=None,
        boxes_x1=boxes1, boxes_x2=batch.boxes2, valid=valid)

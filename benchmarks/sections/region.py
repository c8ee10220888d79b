"""Region section: the fused region_erase and composite ops and the whole region stage, against a
straightforward PyTorch version (per-rectangle slice assignment in a Python loop, a torch.where
composite) timed in the same run on the same inputs. Batch 64 at 224 and at 112 (--quick: 16 at 64).

On CUDA each op is also reported as a fraction of the card's copy bandwidth, counting one read and
one write of the batch, from its GPU time per call (CUDA events around each call, L2 flushed before
it: benchmarks.common.device_seconds_per_call), beside the same fraction for a plain copy of the batch
(what a kernel of this size can reach) and the fraction implied by the wall time of one call and a
synchronisation (what the rows' images/s measure: at these sizes mostly Python, launch and the
synchronisation's round trip). The bytes are the target's: one read and one write of the batch,
whatever an op moves (composite reads a foreground and a background pixel where both are needed;
the in-place erase need not read the pixels it keeps). On CUDA each op's GPU time is also
measured with the vector kernels switched on (d3ssl.ops.region.vector_kernels; the same results),
so one run says which kernels to keep. On the CPU the out= variants writing into a reused buffer get rows of their
own, against the same straightforward version; for region_erase the loop writing into a reused
buffer is timed too. (Fresh CPU outputs of 1 MiB or more come from the ops' cache of freed ones, so
they fault in no new pages either.)
"""
import math

import torch

from benchmarks.common import Row, copy_bandwidth, device_seconds_per_call, interleaved
from d3ssl.augment import samplers as S
from d3ssl.augment.stage import RegionConfig, region_stage
from d3ssl.data.batch import Batch
from d3ssl.ops.region import composite, region_erase, vector_kernels

SECTION = "region"
TARGET_CPU = 10.0        # ours / straightforward, on the CPU
TARGET_BANDWIDTH = 0.7   # fraction of copy bandwidth, on CUDA
K = 4


def make_batch(b, s, device, dtype, seed=0):
    """Random views and K proposals per image inside the view (some padded rows)."""
    g = torch.Generator().manual_seed(seed)

    def boxes():
        wh = s * (0.15 + 0.5 * torch.rand(b, K, 2, generator=g))
        xy = torch.rand(b, K, 2, generator=g) * (s - wh)
        return torch.cat([xy, xy + wh], -1)

    valid = torch.rand(b, K, generator=g) < 0.85
    valid[:, 0] = True
    views = [torch.randn(b, 3, n, n, generator=g) for n in (s, s, s // 2)]
    batch = Batch(*views, boxes(), boxes(), valid, torch.arange(b))
    return batch.to(device, dtype=dtype)


def _spans(rects, h, w):
    """Integer pixel spans (x0, y0, x1, y1) of rects under the ops' pixel rule, as Python lists."""
    s = torch.ceil(rects.double() - 0.5)
    s = torch.minimum(s.clamp(min=0), s.new_tensor([w, h, w, h]))
    return s.long().tolist()


def plain_region_erase(images, rects, erase, offsets, fill, out=None):
    """Straightforward region_erase: copy (into `out` when given), then one slice assignment per
    rectangle."""
    h, w = images.shape[-2:]
    out = images.clone() if out is None else out.copy_(images)
    spans, flags, off = _spans(rects, h, w), erase.tolist(), offsets.tolist()
    for b in range(images.shape[0]):
        for r in range(off[b], off[b + 1]):
            x0, y0, x1, y1 = spans[r]
            if x1 > x0 and y1 > y0:
                out[b, :, y0:y1, x0:x1] = fill if flags[r] else images[b, :, y0:y1, x0:x1]
    return out


def plain_region_erase_(images, rects, erase, offsets, fill):
    """Straightforward in-place region_erase: the erased mask by one slice assignment per rectangle
    (a restore clears it), then one masked fill of `images`."""
    h, w = images.shape[-2:]
    mask = torch.zeros(images.shape[0], 1, h, w, dtype=torch.bool, device=images.device)
    spans, flags, off = _spans(rects, h, w), erase.tolist(), offsets.tolist()
    for b in range(images.shape[0]):
        for r in range(off[b], off[b + 1]):
            x0, y0, x1, y1 = spans[r]
            if x1 > x0 and y1 > y0:
                mask[b, :, y0:y1, x0:x1] = bool(flags[r])
    return images.masked_fill_(mask, fill)


def plain_composite(fg, bg, bg_index, shift, rects, erase, offsets):
    """Straightforward composite: a mask by slice assignment, the shifted foreground by slicing per
    image, then torch.where."""
    bsz, _, h, w = fg.shape
    mask = torch.zeros(bsz, 1, h, w, dtype=torch.bool, device=fg.device)
    moved = torch.zeros_like(fg)
    spans, flags, off, t = _spans(rects, h, w), erase.tolist(), offsets.tolist(), shift.tolist()
    for b in range(bsz):
        for r in range(off[b], off[b + 1]):
            x0, y0, x1, y1 = spans[r]
            mask[b, :, y0:y1, x0:x1] = not flags[r]
        dx, dy = t[b]
        ylo, yhi, xlo, xhi = max(dy, 0), min(h + dy, h), max(dx, 0), min(w + dx, w)
        if ylo < yhi and xlo < xhi:
            moved[b, :, ylo:yhi, xlo:xhi] = fg[b, :, ylo - dy:yhi - dy, xlo - dx:xhi - dx]
        else:
            mask[b] = False
    return torch.where(mask, moved, bg[bg_index])


def plain_region_stage(batch, generator, cfg=RegionConfig()):
    """The region stage with the straightforward ops (same samplers, same draws)."""
    valid, s1, s2 = batch.box_valid, batch.view1.shape[-1], batch.view2_small.shape[-1]

    def erase(view, boxes, size):
        ops = S.concat_ops(
            S.sample_prc(boxes, valid, generator, cfg.prc_scale, cfg.max_cover, size).ops(),
            S.sample_prm(boxes, valid, size, generator, cfg.prm_scale, cfg.prm_ratio).ops())
        return plain_region_erase(view, *ops.csr(), cfg.fill)

    x1_hat = erase(batch.view1, batch.boxes1, s1)
    x2s_hat = erase(batch.view2_small, batch.boxes2 / 2, s2)
    t = S.sample_shift(batch.boxes2, valid, s1, generator).shift
    bg_index = S.sample_background(batch.size, generator, batch.device)
    boxes3 = batch.boxes2 + t[:, None, :].repeat(1, 1, 2).float()
    ops = S.concat_ops(S.box_ops(boxes3, valid, erase=False),
                       S.sample_prc(boxes3, valid, generator, cfg.prc_scale, cfg.max_cover, s1).ops())
    x3 = plain_composite(batch.view2, batch.view2, bg_index, t, *ops.csr())
    boxes = [S.sample_rbj(b, valid, generator, cfg.rbj_p, cfg.rbj_ratio).boxes
             for b in (batch.boxes1, batch.boxes2 / 2, boxes3, batch.boxes1, batch.boxes2)]
    return x1_hat, x2s_hat, x3, boxes


def run(args):
    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    dtype = torch.bfloat16 if on_cuda else torch.float32  # the Batch contract's view dtypes
    sizes = [(16, 64)] if args.quick else [(64, 224), (64, 112)]
    kw = dict(rounds=2, min_time=0.2) if args.quick else dict(rounds=5, min_time=1.0)
    bandwidth = copy_bandwidth(device) if on_cuda else None
    target = None if on_cuda else TARGET_CPU
    rows = []
    for bsz, size in sizes:
        batch = make_batch(bsz, size, device, dtype)
        gen = torch.Generator(device=device).manual_seed(0)
        valid = batch.box_valid
        ops = S.concat_ops(S.sample_prc(batch.boxes1, valid, gen, image_size=size).ops(),
                           S.sample_prm(batch.boxes1, valid, size, gen).ops())
        rects, erase, offsets = ops.csr()
        x = batch.view1
        t = S.sample_shift(batch.boxes2, valid, size, gen).shift
        bg_index = S.sample_background(bsz, gen, device)
        boxes3 = batch.boxes2 + t[:, None, :].repeat(1, 1, 2).float()
        cops = S.concat_ops(S.box_ops(boxes3, valid, erase=False),
                            S.sample_prc(boxes3, valid, gen, image_size=size).ops())
        crects, cerase, coffsets = cops.csr()
        scratch, scratch_plain = x.clone(), x.clone()
        reused, reused_plain, reused_c = torch.empty_like(x), torch.empty_like(x), torch.empty_like(x)
        tag = f"B={bsz} S={size} {str(dtype).replace('torch.', '')} channels_last"
        cases = {
            "region_erase (PRC+PRM)": (
                lambda: region_erase(x, rects, erase, offsets, 0.0),
                lambda: plain_region_erase(x, rects, erase, offsets, 0.0)),
            "region_erase_ (in place)": (
                lambda: torch.ops.d3ssl.region_erase_(scratch, rects, erase, offsets, 0.0),
                lambda: plain_region_erase_(scratch_plain, rects, erase, offsets, 0.0)),
            "composite (de-positioning)": (
                lambda: composite(x, batch.view2, bg_index, t, crects, cerase, coffsets),
                lambda: plain_composite(x, batch.view2, bg_index, t, crects, cerase, coffsets)),
        }
        if not on_cuda:  # (on CUDA the caching allocator already makes fresh outputs cheap)
            # The out= variants write into a buffer reused across calls.
            cases["region_erase (out=, reused buffer)"] = (
                lambda: region_erase(x, rects, erase, offsets, 0.0, out=reused),
                lambda: plain_region_erase(x, rects, erase, offsets, 0.0))
            cases["composite (out=, reused buffer)"] = (
                lambda: composite(x, batch.view2, bg_index, t, crects, cerase, coffsets, out=reused_c),
                lambda: plain_composite(x, batch.view2, bg_index, t, crects, cerase, coffsets))
        # The straightforward version given the same reused buffer (copy_ into it, then the loop).
        plain_into = lambda: plain_region_erase(x, rects, erase, offsets, 0.0, out=reused_plain)
        # For scale: a fresh tensor and one copy of the batch. On the CPU at S=224 it is dominated
        # by first-touch page faults of the new memory (the anchor's clone pays them too; our CPU
        # kernels take fresh outputs from a cache of freed ones, which faults no pages at all).
        floor = interleaved({"copy": lambda: torch.empty_like(x).copy_(x)}, device, **kw)["copy"]
        if on_cuda:
            copy_kernel = device_seconds_per_call(lambda: reused.copy_(x), device)
        for name, (ours, plain) in cases.items():
            fns = {"ours": ours, "plain": plain}
            if name == "region_erase (out=, reused buffer)":
                fns["plain_into"] = plain_into
            sec = interleaved(fns, device, **kw)
            extra = {"speed relative to empty_like+copy_ of the batch": f"{floor / sec['ours']:.2f}"}
            if "plain_into" in sec:
                extra["ratio to the loop writing into a reused buffer"] = (
                    f"{sec['plain_into'] / sec['ours']:.2f}")
            if on_cuda:
                nbytes = 2 * x.numel() * x.element_size()
                kernel = device_seconds_per_call(ours, device)
                extra["fraction of copy bandwidth (GPU time)"] = (
                    f"{nbytes / kernel / bandwidth:.2f} (target {TARGET_BANDWIDTH})")
                extra["the same for a copy of the batch"] = f"{nbytes / copy_kernel / bandwidth:.2f}"
                extra["the same from wall time per synchronised call"] = (
                    f"{nbytes / sec['ours'] / bandwidth:.2f}")
                extra["GPU time per call (us)"] = f"{kernel * 1e6:.1f}"
                with vector_kernels(True):  # the same op with the vector kernels (region_vec.cuh)
                    vec = device_seconds_per_call(ours, device)
                extra["vector kernels: fraction of copy bandwidth (GPU time)"] = (
                    f"{nbytes / vec / bandwidth:.2f} (target {TARGET_BANDWIDTH})")
                extra["vector kernels: GPU time per call (us)"] = f"{vec * 1e6:.1f}"
            rows.append(Row(SECTION, f"{name} {tag}", bsz / sec["ours"], bsz / sec["plain"],
                            "slice-assignment loop", target=target, extra=extra))
        g1 = torch.Generator(device=device).manual_seed(1)
        g2 = torch.Generator(device=device).manual_seed(1)
        held = {}

        def stage_step():  # a training loop's pattern: the last step's views are still bound
            held["views"] = region_stage(batch, g1)
        sec = interleaved({"ours": stage_step,
                           "plain": lambda: plain_region_stage(batch, g2)}, device, **kw)
        rows.append(Row(SECTION, f"region stage {tag}", bsz / sec["ours"], bsz / sec["plain"],
                        "same samplers + loop ops", target=target))
    return rows

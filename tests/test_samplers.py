"""Sampler invariants, measured on the sampled rectangles and on the ops' output."""
import pytest
import torch

from d3ssl.augment import samplers as S
from d3ssl.ops.region import region_erase_reference
from tests.conftest import DEVICES


def random_boxes(b, k, size, seed=0, min_size=8.0, nested=True):
    """float32 [B,K,4] boxes inside a size x size view (non-integer corners, at least min_size
    pixels a side), valid [B,K] with some padded rows (padding repeats row 0, as loaders pad). With
    `nested`, row 1 lies inside row 0 so that PRC's restore rule is exercised."""
    g = torch.Generator().manual_seed(seed)
    wh = min_size + torch.rand(b, k, 2, generator=g) * (size * 0.7 - min_size)
    xy = torch.rand(b, k, 2, generator=g) * (size - wh)
    boxes = torch.cat([xy, xy + wh], -1)
    if nested and k > 1:
        outer = boxes[:, 0]
        owh = outer[:, 2:] - outer[:, :2]
        iwh = owh * (0.3 + 0.3 * torch.rand(b, 2, generator=g))
        ixy = outer[:, :2] + torch.rand(b, 2, generator=g) * (owh - iwh)
        boxes[:, 1] = torch.cat([ixy, ixy + iwh], -1)
    valid = torch.rand(b, k, generator=g) < 0.75
    valid[:, 0] = True
    valid[-1, 1:] = False
    boxes = torch.where(valid[..., None], boxes, boxes[:, :1])
    return boxes.float(), valid


def covered(rect, h, w):
    """bool [H,W] pixels whose centre lies in the rect (float64)."""
    x1, y1, x2, y2 = (float(v) for v in rect)
    xs = torch.arange(w, dtype=torch.float64) + 0.5
    ys = torch.arange(h, dtype=torch.float64) + 0.5
    return ((ys >= y1) & (ys < y2))[:, None] & ((xs >= x1) & (xs < x2))[None, :]


def erased_map(rects, erase, h, w):
    """bool [H,W]: which pixels the ops rects [N,4], erase [N] leave erased (through the reference op)."""
    ones = torch.ones(1, 1, h, w)
    out = region_erase_reference(ones, rects.reshape(-1, 4), erase.reshape(-1),
                                 torch.tensor([0, rects.shape[0]]), 0.0)
    return out[0, 0] == 0


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_prc_invariants():
    size, max_cover = 48, 0.5
    boxes, valid = random_boxes(64, 4, size, seed=3)
    prc = S.sample_prc(boxes, valid, gen(1), scale=(0.2, 0.5), max_cover=max_cover, image_size=size)
    assert prc.rects.shape == (64, 8, 4) and prc.erase.shape == (64, 8)
    restores = cutouts = 0
    for b in range(64):
        pix = [covered(boxes[b, j], size, size) for j in range(4)]
        live = [bool(valid[b, j]) and bool(pix[j].any()) for j in range(4)]
        # our own order: largest pixel area first, ties by index, padded last
        order = sorted(range(4), key=lambda j: (not live[j], -int(pix[j].sum()) if live[j] else 0, j))
        for s, j in enumerate(order):
            restore, cut = prc.rects[b, 2 * s], prc.rects[b, 2 * s + 1]
            assert not prc.erase[b, 2 * s] and prc.erase[b, 2 * s + 1]
            if not live[j]:
                assert not covered(restore, size, size).any() and not covered(cut, size, size).any()
                continue
            area = int(pix[j].sum())
            before = int((erased_map(prc.rects[b, :2 * s], prc.erase[b, :2 * s], size, size) & pix[j]).sum())
            after = int((erased_map(prc.rects[b, :2 * s + 2], prc.erase[b, :2 * s + 2], size, size) & pix[j]).sum())
            restored = covered(restore, size, size)
            # a restore happens exactly when more than max_cover was erased before the turn
            assert restored.any() == (before > max_cover * area), (b, s, before, area)
            if restored.any():
                assert torch.equal(restored, pix[j])
                restores += 1
            assert after <= max_cover * area, (b, s, after, area)
            cpix = covered(cut, size, size)
            if cpix.any():
                cutouts += 1
                assert not (cpix & ~pix[j]).any()  # inside the proposal
                w, h = float(cut[2] - cut[0]), float(cut[3] - cut[1])
                pw = int(pix[j].any(0).sum())
                ph = int(pix[j].any(1).sum())
                # the proposal's aspect ratio: w = floor(pw*t), h = floor(ph*t) for one t
                assert max(w / pw, h / ph) < min((w + 1) / pw, (h + 1) / ph)
                # its area tops the proposal up from what was erased before its turn (c, 0 after a
                # restore) towards the target a ~ U(0.2, 0.5): w*h = floor(pw*t)*floor(ph*t) with
                # t^2 = a - c, so c*area + w*h lies in [0.2*area - (pw + ph), 0.5*area]
                c_pixels = 0 if restored.any() else before
                assert 0.2 * area - (pw + ph) <= c_pixels + w * h <= 0.5 * area + 1e-6, (b, s, c_pixels, w * h, area)
            if s == 0:  # nothing erased before: the target U(0.2,0.5) up to whole-pixel rounding
                pw, ph = int(pix[j].any(0).sum()), int(pix[j].any(1).sum())
                assert after >= 0.2 * area - (pw + ph)
    assert restores > 0 and cutouts > 40


def test_prc_max_cover_zero_never_erases_twice():
    """max_cover = 0: any overlap with earlier cutouts restores the proposal before its own cutout."""
    size = 40
    boxes, valid = random_boxes(16, 4, size, seed=5)
    prc = S.sample_prc(boxes, valid, gen(2), max_cover=0.0, image_size=size)
    for b in range(16):
        for s in range(4):
            j = int(prc.order[b, s])
            if not valid[b, j]:
                continue
            pix = covered(boxes[b, j], size, size)
            after = erased_map(prc.rects[b, :2 * s + 2], prc.erase[b, :2 * s + 2], size, size) & pix
            cut = covered(prc.rects[b, 2 * s + 1], size, size)
            assert torch.equal(after, cut & pix)  # only its own cutout remains in it


def test_prm_invariants():
    size = 64
    boxes, valid = random_boxes(32, 4, size, seed=4, min_size=10)
    prm = S.sample_prm(boxes, valid, size, gen(3), scale=(0.2, 0.6), ratio=(3 / 4, 4 / 3))
    assert prm.rects.shape == (32, 4, 4)
    r = prm.rects
    assert torch.equal(r, r.round())
    assert (r >= 0).all() and (r[..., 2] <= size).all() and (r[..., 3] <= size).all()
    checked_area = 0
    sides = set()
    for b in range(32):
        for j in range(4):
            m = covered(r[b, j], size, size)
            if not valid[b, j]:
                assert not m.any()
                continue
            if not m.any():  # the side lies on the image border: nothing to mask
                continue
            p = covered(boxes[b, j], size, size)
            assert not (m & p).any()  # outside the proposal
            grown = p.clone()
            grown[1:] |= p[:-1]
            grown[:-1] |= p[1:]
            grown[:, 1:] |= p[:, :-1]
            grown[:, :-1] |= p[:, 1:]
            assert (m & grown).any()  # touching it
            # which side: the mask's rows/columns relative to the proposal's
            rows, cols = m.any(1).nonzero()[:, 0], m.any(0).nonzero()[:, 0]
            prow, pcol = p.any(1).nonzero()[:, 0], p.any(0).nonzero()[:, 0]
            sides.add("top" if rows.max() < prow.min() else "bottom" if rows.min() > prow.max()
                      else "left" if cols.max() < pcol.min() else "right")
            x1, y1, x2, y2 = r[b, j].tolist()
            if 0 < x1 and 0 < y1 and x2 < size and y2 < size:  # not clipped: area and ratio
                w, h, area = x2 - x1, y2 - y1, int(p.sum())
                assert (w - 0.5) * (h - 0.5) <= 0.6 * area and (w + 0.5) * (h + 0.5) >= 0.2 * area
                assert (w + 0.5) / (h - 0.5) >= 3 / 4 and (w - 0.5) / (h + 0.5) <= 4 / 3
                checked_area += 1
    assert checked_area > 10 and sides == {"top", "bottom", "left", "right"}


def test_rbj_invariants():
    boxes, valid = random_boxes(64, 4, 100, seed=6)
    out = S.sample_rbj(boxes, valid, gen(4), p=0.5, ratio=0.1)
    nb = out.boxes
    assert nb.dtype == torch.float32 and nb.shape == boxes.shape
    inside = (nb[..., :2] >= boxes[..., :2]).all(-1) & (nb[..., 2:] <= boxes[..., 2:]).all(-1)
    assert inside.all()
    assert (nb[..., 2] > nb[..., 0]).all() and (nb[..., 3] > nb[..., 1]).all()
    changed = (nb != boxes).any(-1)
    assert not changed[~valid].any()  # padded rows untouched
    frac = changed[valid].float().mean().item()
    assert 0.3 < frac < 0.7  # about p = 0.5 of the valid boxes move
    # restricted: a jittered box keeps at least 80% of the width and height (shrink <= 10%, shift <= 10%)
    w0, w1 = boxes[..., 2] - boxes[..., 0], nb[..., 2] - nb[..., 0]
    assert (w1 >= 0.8 * w0 - 1e-4).all()


def test_soco_jitter_and_cutout():
    size = 80
    boxes, valid = random_boxes(64, 4, size, seed=7)
    out = S.sample_soco_jitter(boxes, valid, size, gen(5)).boxes
    assert (out >= 0).all() and (out <= size).all()
    assert (out[..., 2] > out[..., 0]).all() and (out[..., 3] > out[..., 1]).all()
    outside = (out[..., :2] < boxes[..., :2]).any(-1) | (out[..., 2:] > boxes[..., 2:]).any(-1)
    assert outside[valid].any()  # not restricted to the box
    assert torch.equal(out[~valid], boxes[~valid])
    ops = S.sample_soco_cutout(boxes, valid, gen(6), image_size=size)
    for b in range(16):
        for j in range(4):
            m = covered(ops.rects[b, j], size, size)
            if not valid[b, j]:
                assert not m.any()
                continue
            p = covered(boxes[b, j], size, size)
            assert m.any() and not (m & ~p).any()
            frac = m.sum().item() / p.sum().item()
            assert 0.1 < frac < 0.65


def test_shift_keeps_boxes_inside_and_covers_the_range():
    size = 32
    boxes = torch.tensor([[10.0, 10.5, 20.0, 20.0], [12, 12, 15, 25]]).expand(2000, 2, 4).clone()
    valid = torch.ones(2000, 2, dtype=torch.bool)
    valid[0] = False
    t = S.sample_shift(boxes, valid, size, gen(7)).shift
    assert t.dtype == torch.int64 and t.shape == (2000, 2)
    assert torch.equal(t[0], torch.zeros(2, dtype=torch.int64))  # no valid box: no shift
    moved = boxes + t[:, None, :].repeat(1, 1, 2)
    assert (moved[1:] >= 0).all() and (moved[1:] <= size).all()
    # union: x in [10, 20] -> dx in [-10, 12]; y in [10.5, 25] -> dy in [-10, 7]
    assert t[1:, 0].min() == -10 and t[1:, 0].max() == 12
    assert t[1:, 1].min() == -10 and t[1:, 1].max() == 7
    counts = torch.bincount(t[1:, 0] + 10)
    assert counts.min() > 40  # roughly uniform over the 23 values


def test_subset_takes_n_of_the_valid_boxes_uniformly():
    valid = torch.tensor([[True, True, True, True], [True, False, True, False],
                          [False, False, False, False], [False, True, False, False]]).repeat(1000, 1)
    for n in (1, 2, 5):
        chosen = S.sample_subset(valid, n, gen(n))
        assert chosen.dtype == torch.bool and chosen.shape == valid.shape
        assert not (chosen & ~valid).any()                              # never a padded box
        assert torch.equal(chosen.sum(1), valid.sum(1).clamp(max=n))    # min(n, valid) per image
    chosen = S.sample_subset(valid, 1, gen(3))
    freq = chosen[0::4].float().mean(0)                                 # four valid boxes, one taken
    assert ((freq - 0.25).abs() < 0.05).all(), freq
    assert torch.equal(chosen[3::4].sum(0), torch.tensor([0, 1000, 0, 0]))
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        S.sample_subset(valid, 0, gen())
    with pytest.raises(ValueError, match="valid must be bool"):
        S.sample_subset(valid.int(), 1, gen())


def test_background_is_a_derangement():
    for b in (2, 3, 7):
        for seed in range(5):
            idx = S.sample_background(b, gen(seed), "cpu")
            assert sorted(idx.tolist()) == list(range(b))
            assert (idx != torch.arange(b)).all()
    assert S.sample_background(1, gen(0), "cpu").tolist() == [0]


@pytest.mark.parametrize("device", DEVICES)
def test_same_seed_same_output_on_every_device(device):
    boxes, valid = random_boxes(8, 4, 64, seed=8)
    def draw(dev):
        g = gen(11)
        b, v = boxes.to(dev), valid.to(dev)
        return [S.sample_prc(b, v, g, image_size=64).rects, S.sample_prm(b, v, 64, g).rects,
                S.sample_rbj(b, v, g).boxes, S.sample_shift(b, v, 64, g).shift,
                S.sample_background(8, g, dev)]
    first, again, there = draw("cpu"), draw("cpu"), draw(device)
    for a, b, c in zip(first, again, there):
        assert torch.equal(a, b) and torch.equal(a, c.cpu())
    other = S.sample_prc(boxes, valid, gen(12), image_size=64).rects
    assert not torch.equal(first[0], other)


def test_bad_arguments():
    boxes, valid = random_boxes(2, 3, 32)
    with pytest.raises(ValueError, match="boxes must be float"):
        S.sample_prc(boxes[..., :3], valid, gen())
    with pytest.raises(ValueError, match="valid must be bool"):
        S.sample_prm(boxes, valid.int(), 32, gen())
    with pytest.raises(ValueError, match="valid must be bool"):
        S.sample_rbj(boxes, valid[:, :2], gen())
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        S.sample_shift(boxes, valid, 32, 0)


def plan_inputs(b, k, size, seed, n):
    """Boxes as the sampling ops get them, with uniforms u float64 [B,K,n]: some partly outside
    the view, nested, padded, thinner than a pixel, and (every third seed) on half-pixel corners,
    where the pixel rule's ceil(v - 0.5) meets its ties."""
    boxes, valid = random_boxes(b, k, size, seed=seed, min_size=1.0)
    g = gen(seed + 1000)
    boxes = boxes + (torch.rand(b, k, 4, generator=g) - 0.5) * size * 0.1  # some cross the border
    if seed % 3 == 1:
        boxes = (boxes * 2).round() / 2
    boxes[0, 0, 2] = boxes[0, 0, 0] + 0.3
    return boxes, valid, torch.rand(b, k, n, generator=g, dtype=torch.float64)


def assert_same(out, ref):
    """Bit-identical tuples of tensors (dtype, shape and every value), out possibly on a GPU."""
    out, ref = (out,) if torch.is_tensor(out) else out, (ref,) if torch.is_tensor(ref) else ref
    assert len(out) == len(ref)
    for o, r in zip(out, ref):
        assert o.dtype == r.dtype and o.shape == r.shape
        assert torch.equal(o.cpu(), r)


def on(device, *tensors):
    return [t.to(device) for t in tensors]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [1, 2, 4, 8])
@pytest.mark.parametrize("scale, max_cover", [((0.2, 0.5), 0.5), ((0.3, 0.95), 0.1), ((0.0, 1.0), 0.0)])
def test_prc_plan_op_matches_the_reference_exactly(device, k, scale, max_cover):
    """The op (visiting order and turns, csrc/ops/samplers.h and prc.h) gives bit-identical
    rectangles and order to the PyTorch reference, restores included (the second setting restores
    often), with and without clipping to the view."""
    from d3ssl.ops.sampling import prc_plan
    restores = 0
    for seed in range(12):
        boxes, valid, u = plan_inputs(16, k, 48, seed, 3)
        for size in (48, (40, 56), None):
            ref = S.prc_reference(boxes, valid, u, size, scale, max_cover)
            out = prc_plan(*on(device, boxes, valid, u), size, scale, max_cover)
            assert_same(out, ref)
            restores += int((ref[0][:, 0::2].abs().sum(-1) > 0).sum())
    if k > 1 and max_cover < 0.5:
        assert restores > 0  # the restore branch was exercised


@pytest.mark.parametrize("device", DEVICES)
def test_prc_plan_at_its_most_proposals(device):
    """K = PRC_MAX_BOXES fills the op's scratch arrays (4K - 2 cell edges per axis)."""
    from d3ssl.ops.sampling import PRC_MAX_BOXES, prc_plan
    boxes, valid, u = plan_inputs(3, PRC_MAX_BOXES, 64, 7, 3)
    ref = S.prc_reference(boxes, valid, u, 64, (0.3, 0.95), 0.1)
    assert_same(prc_plan(*on(device, boxes, valid, u), 64, (0.3, 0.95), 0.1), ref)
    assert (ref[0][:, 0::2].abs().sum(-1) > 0).any()  # restores happened


def test_prc_more_proposals_than_the_op_plans_falls_back_to_the_reference():
    from d3ssl.ops.sampling import PRC_MAX_BOXES, prc_plan
    k = PRC_MAX_BOXES + 1
    boxes, valid = random_boxes(2, k, 96, seed=3, min_size=2.0)
    prc = S.sample_prc(boxes, valid, gen(5), image_size=96)
    u = S._uniform((2, k, 3), gen(5), "cpu")  # the same draws
    with pytest.raises(RuntimeError, match=f"at most {PRC_MAX_BOXES} proposals"):
        prc_plan(boxes, valid, u, 96, (0.2, 0.5), 0.5)
    assert_same((prc.rects, prc.order), S.prc_reference(boxes, valid, u, 96, (0.2, 0.5), 0.5))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale, ratio", [((0.2, 0.6), (3 / 4, 4 / 3)), ((0.01, 2.0), (0.2, 5.0))])
def test_prm_plan_matches_the_reference_exactly(device, scale, ratio):
    from d3ssl.ops.sampling import prm_plan
    kept = 0
    for seed in range(12):
        boxes, valid, u = plan_inputs(16, 5, 40, seed, 4)
        for size in (40, (32, 48)):
            ref = S.prm_reference(boxes, valid, u, size, scale, ratio)
            assert_same(prm_plan(*on(device, boxes, valid, u), size, scale, ratio), ref)
            kept += int((ref[0].abs().sum(-1) > 0).sum())
    assert 0 < kept < 12 * 2 * 16 * 5  # some masks kept, some dropped (padded or outside the view)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size, shift, scale", [(None, (-0.1, 0.1), (-0.1, 0.0)),   # RBJ
                                                (None, (-0.4, 0.4), (-0.9, 0.0)),
                                                (40, (-0.1, 0.1), (-0.1, 0.1)),     # the baseline's
                                                ((30, 50), (-0.5, 0.5), (-0.5, 0.5))])
def test_jitter_plan_matches_the_reference_exactly(device, size, shift, scale):
    from d3ssl.ops.sampling import jitter_plan
    jittered = 0
    for seed in range(12):
        boxes, valid, u = plan_inputs(16, 5, 40, seed, 5)
        boxes, valid, u = boxes.expand(3, -1, -1, -1), valid.expand(3, -1, -1), torch.cat([u, u.flip(0), u * 0.5])
        ref = S.jitter_reference(boxes, valid, u.view(3, 16, 5, 5), 0.6, shift, scale, size)
        assert_same(jitter_plan(*on(device, boxes, valid, u.view(3, 16, 5, 5)), 0.6, shift, scale, size), ref)
        jittered += int(ref[1].sum())
    assert 0 < jittered < 12 * 3 * 16 * 5


@pytest.mark.parametrize("device", DEVICES)
def test_shift_plan_matches_the_reference_exactly(device):
    from d3ssl.ops.sampling import shift_plan
    moved = 0
    for seed in range(12):
        boxes, valid, u = plan_inputs(16, 4, 40, seed, 2)
        u = u[:, 0]
        valid[1] = False                        # no valid boxes: no shift
        boxes[2, :, 2:] = boxes[2, :, :2] + 70  # larger than the view: no room on either axis
        for size in (40, (36, 64)):
            ref = S.shift_reference(boxes, valid, u, size)
            assert_same(shift_plan(*on(device, boxes, valid, u), size), ref)
            assert ref[1].abs().sum() == 0 and ref[2].abs().sum() == 0
            moved += int((ref != 0).sum())
    assert moved > 0


def bits(t):
    """Raw bits of a float32 tensor (tells -0.0 from +0.0, compares NaN with NaN), else t."""
    return t.view(torch.int32) if t.dtype == torch.float32 else t


@pytest.mark.parametrize("device", DEVICES)
def test_sampling_ops_match_the_references_on_non_finite_and_signed_zero_boxes(device):
    """Boxes with NaN, infinite and -0.0 corners (no sampler gets them from a loader, but the ops
    are public): op and reference agree bit for bit, signs of zero included; an infinite proposal
    (possible without clipping) is not live, and a non-finite bound leaves the shift at 0."""
    from d3ssl.ops.sampling import jitter_plan, prc_plan, prm_plan, shift_plan
    g = gen(21)
    for seed in range(8):
        boxes, valid, u = plan_inputs(8, 5, 48, seed, 5)
        special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0])
        pick = torch.rand(boxes.shape, generator=g) < 0.15
        boxes = torch.where(pick, special[torch.randint(0, 5, boxes.shape, generator=g)], boxes)
        d = on(device, boxes, valid, u)
        pairs = [(prc_plan(d[0], d[1], d[2][..., :3].contiguous(), None, (0.2, 0.5), 0.5),
                  S.prc_reference(boxes, valid, u[..., :3], None, (0.2, 0.5), 0.5)),
                 (prm_plan(d[0], d[1], d[2][..., :4].contiguous(), 48, (0.2, 0.6), (0.75, 4 / 3)),
                  S.prm_reference(boxes, valid, u[..., :4], 48, (0.2, 0.6), (0.75, 4 / 3))),
                 (jitter_plan(*d, 0.6, (-0.1, 0.1), (-0.1, 0.0)),
                  S.jitter_reference(boxes, valid, u, 0.6, (-0.1, 0.1), (-0.1, 0.0))),
                 (jitter_plan(*d, 0.6, (-0.5, 0.5), (-0.5, 0.5), 48),
                  S.jitter_reference(boxes, valid, u, 0.6, (-0.5, 0.5), (-0.5, 0.5), 48)),
                 (shift_plan(d[0], d[1], d[2][:, 0, :2].contiguous(), 48),
                  S.shift_reference(boxes, valid, u[:, 0, :2], 48))]
        for out, ref in pairs:
            out, ref = (out,) if torch.is_tensor(out) else out, (ref,) if torch.is_tensor(ref) else ref
            for o, r in zip(out, ref):
                assert o.dtype == r.dtype and torch.equal(bits(o.cpu()), bits(r))
        rects = pairs[0][1][0]
        assert torch.isfinite(rects).all()  # no cutout of an infinite proposal
    empty = torch.zeros(3, 0, 4)
    assert_same(shift_plan(empty, torch.zeros(3, 0, dtype=torch.bool), u[:3, 0, :2], 48),
                S.shift_reference(empty, torch.zeros(3, 0, dtype=torch.bool), u[:3, 0, :2], 48))


def test_sampling_ops_bad_input():
    from d3ssl.ops.sampling import jitter_plan, prc_plan, prm_plan, shift_plan
    boxes, valid, u = plan_inputs(2, 3, 32, 0, 5)
    with pytest.raises(RuntimeError, match=r"prc_plan: boxes must be float32"):
        prc_plan(boxes.double(), valid, u[..., :3], 32, (0.2, 0.5), 0.5)
    with pytest.raises(RuntimeError, match=r"prc_plan: u must be float64"):
        prc_plan(boxes, valid, u, 32, (0.2, 0.5), 0.5)
    with pytest.raises(RuntimeError, match=r"prm_plan: valid must be bool"):
        prm_plan(boxes, valid.int(), u[..., :4], 32, (0.2, 0.6), (0.75, 1.33))
    with pytest.raises(RuntimeError, match=r"prm_plan: size must be \(H, W\)"):
        prm_plan(boxes, valid, u[..., :4], None, (0.2, 0.6), (0.75, 1.33))
    with pytest.raises(RuntimeError, match=r"jitter_plan: valid must be bool"):
        jitter_plan(boxes, valid[:, :2], u, 0.5, (-0.1, 0.1), (-0.1, 0.0))
    with pytest.raises(RuntimeError, match=r"jitter_plan: u must be float64"):
        jitter_plan(boxes, valid, u.float(), 0.5, (-0.1, 0.1), (-0.1, 0.0))
    with pytest.raises(RuntimeError, match=r"shift_plan: u must be float64 \[B,2\]"):
        shift_plan(boxes, valid, u[..., :2], 32)
    with pytest.raises(RuntimeError, match=r"size must be non-negative"):
        shift_plan(boxes, valid, u[:, 0, :2], (-1, 32))


def test_samplers_take_the_reference_path_for_other_box_dtypes():
    """float64 boxes go through the PyTorch references: with float32-representable values they
    give the float32 (op) results."""
    boxes, valid = random_boxes(8, 4, 64, seed=2)
    for f in (lambda b: S.sample_prc(b, valid, gen(3), image_size=64)[:1:],
              lambda b: (S.sample_prm(b, valid, 64, gen(3)).rects,),
              lambda b: (S.sample_shift(b, valid, 64, gen(3)).shift,)):
        assert_same(f(boxes.double()), f(boxes))


@pytest.mark.parametrize("device", DEVICES)
def test_sampling_opcheck(device):
    boxes, valid, u = on(device, *plan_inputs(4, 3, 32, 0, 5))
    ops = torch.ops.d3ssl
    torch.library.opcheck(ops.prc_plan.default, (boxes, valid, u[..., :3].contiguous(), [32, 32], 0.2, 0.3, 0.5))
    torch.library.opcheck(ops.prm_plan.default, (boxes, valid, u[..., :4].contiguous(), [32, 40], 0.2, 0.4, 0.75, 0.5))
    torch.library.opcheck(ops.jitter_plan.default, (boxes, valid, u, [], 0.5, -0.1, 0.2, -0.1, 0.1))
    torch.library.opcheck(ops.shift_plan.default, (boxes, valid, u[:, 0, :2].contiguous(), [32, 32]))


def test_rbj_views_in_one_pass_equal_one_call_per_view():
    boxes, valid = random_boxes(6, 4, 64, seed=4)
    views = [boxes, boxes / 2, boxes + 3, boxes * 0.9]
    g1, g2 = gen(9), gen(9)
    together = S.sample_rbj_views(views, valid, g1, p=0.7, ratio=0.2)
    one_by_one = [S.sample_rbj(b, valid, g2, p=0.7, ratio=0.2) for b in views]
    assert len(together) == len(views)
    for a, b in zip(together, one_by_one):
        assert torch.equal(a.boxes, b.boxes) and torch.equal(a.jittered, b.jittered)
    assert any(r.jittered.any() for r in together)
    # the generators were advanced alike
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))
    assert S.sample_rbj_views([], valid, gen(0)) == []


def test_image_size_takes_ints_and_pairs_and_rejects_the_rest():
    import numpy as np

    from d3ssl.ops.sampling import image_hw
    assert image_hw(224) == (224, 224) and image_hw(np.int64(64)) == (64, 64)
    assert image_hw((32, 48)) == image_hw(torch.Size([32, 48])) == image_hw([np.int32(32), 48]) == (32, 48)
    assert image_hw(torch.tensor(9)) == image_hw(np.array(9)) == (9, 9)
    assert image_hw(np.array([32, 48])) == image_hw(torch.tensor([32, 48])) == (32, 48)
    for bad in (224.5, (224.0, 224), (1, 2, 3), "224", True, None, np.array([3.5, 4.0]), np.array(7.0)):
        with pytest.raises(ValueError, match="image_size must be an int or an"):
            image_hw(bad)
    boxes, valid = random_boxes(2, 3, 32)
    with pytest.raises(ValueError, match="image_size must be"):
        S.sample_shift(boxes, valid, 32.5, gen())
    # the same draws whatever integer type the size comes in
    assert torch.equal(S.sample_prm(boxes, valid, np.int64(32), gen(4)).rects,
                       S.sample_prm(boxes, valid, (32, 32), gen(4)).rects)

"""The region stage end to end on random Batches."""
import dataclasses

import pytest
import torch

from d3ssl.augment import samplers as S
from d3ssl.augment.stage import RegionConfig, SocoAugConfig, region_stage, soco_stage
from d3ssl.data.batch import Batch
from d3ssl.ops.region import composite_reference, region_erase_reference
from tests.conftest import DEVICES
from tests.test_samplers import covered, random_boxes


def make_batch(b=6, s=32, k=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    boxes1, valid = random_boxes(b, k, s, seed=seed)
    boxes2, _ = random_boxes(b, k, s, seed=seed + 100)
    boxes2 = torch.where(valid[..., None], boxes2, boxes2[:, :1])
    views = [torch.randn(b, 3, n, n, generator=g).to(dtype).to(memory_format=torch.channels_last)
             for n in (s, s, s // 2)]
    return Batch(*views, boxes1, boxes2, valid, torch.arange(b)).validate()


def test_shapes_layout_and_teacher_views():
    batch = make_batch()
    out = region_stage(batch, torch.Generator().manual_seed(0))
    assert out.x1 is batch.view1 and out.x2 is batch.view2 and out.valid is batch.box_valid
    for name, ref in (("x1_hat", batch.view1), ("x2s_hat", batch.view2_small), ("x3", batch.view2)):
        v = getattr(out, name)
        assert v.shape == ref.shape and v.dtype == ref.dtype
        assert v.is_contiguous(memory_format=torch.channels_last)
    for name in ("boxes_x1_hat", "boxes_x2s_hat", "boxes_x3", "boxes_x1", "boxes_x2"):
        assert getattr(out, name).shape == batch.boxes1.shape
        assert getattr(out, name).dtype == torch.float32
    # erased pixels hold the fill value, the rest is the input
    for hat, ref in ((out.x1_hat, batch.view1), (out.x2s_hat, batch.view2_small)):
        same = hat == ref
        assert ((hat == 0) | same).all() and (~same).any()


def test_matches_samplers_and_references_in_documented_order():
    """Rebuild every output from the samplers (draw order of the stage's docstring) and the loop
    references of the ops."""
    batch, cfg = make_batch(seed=1), RegionConfig(fill=0.25)
    out = region_stage(batch, torch.Generator().manual_seed(5), cfg)
    g = torch.Generator().manual_seed(5)
    v = batch.box_valid
    b1, b2, b2s = batch.boxes1, batch.boxes2, batch.boxes2 / 2

    def erase_views(view, boxes, size):
        ops = S.concat_ops(S.sample_prc(boxes, v, g, image_size=size).ops(),
                           S.sample_prm(boxes, v, size, g).ops())
        return region_erase_reference(view, *ops.csr(), fill=0.25)

    assert torch.equal(out.x1_hat, erase_views(batch.view1, b1, 32))
    assert torch.equal(out.x2s_hat, erase_views(batch.view2_small, b2s, 16))
    t = S.sample_shift(b2, v, 32, g).shift
    bg_index = S.sample_background(6, g, "cpu")
    b3 = b2 + t[:, None].repeat(1, 1, 2)
    ops = S.concat_ops(S.box_ops(b3, v, erase=False), S.sample_prc(b3, v, g, image_size=32).ops())
    assert torch.equal(out.x3, composite_reference(batch.view2, batch.view2, bg_index, t, *ops.csr()))
    for name, boxes in (("boxes_x1_hat", b1), ("boxes_x2s_hat", b2s), ("boxes_x3", b3),
                        ("boxes_x1", b1), ("boxes_x2", b2)):
        assert torch.equal(getattr(out, name), S.sample_rbj(boxes, v, g).boxes), name


def test_depositioning_view_without_prc():
    """x3 with PRC off: inside the shifted boxes view2 moved by t, elsewhere another image's view2."""
    batch = make_batch(b=5, seed=2)
    cfg = RegionConfig(prc=False, prm=False, rbj=False)
    out = region_stage(batch, torch.Generator().manual_seed(3), cfg)
    assert torch.equal(out.x1_hat, batch.view1) and torch.equal(out.x2s_hat, batch.view2_small)
    t = (out.boxes_x3 - batch.boxes2)[..., :2]
    assert torch.equal(t, t.round()) and (t == t[:, :1]).all()
    t = t[:, 0].long()
    for i in range(5):
        mask = torch.zeros(32, 32, dtype=torch.bool)
        for j in range(4):
            if batch.box_valid[i, j]:
                box = out.boxes_x3[i, j]
                assert (box >= 0).all() and (box <= 32).all()
                mask |= covered(box, 32, 32)
        moved = torch.roll(batch.view2[i], shifts=(int(t[i, 1]), int(t[i, 0])), dims=(1, 2))
        assert torch.equal(out.x3[i][:, mask], moved[:, mask])
        others = [j for j in range(5) if j != i and torch.equal(out.x3[i][:, ~mask], batch.view2[j][:, ~mask])]
        assert len(others) == 1  # the background is one other image of the batch


def test_depositioning_with_a_subset_of_boxes():
    """dp_boxes=1: x3 pastes one drawn box per image, the shift keeps that box (not the union of all)
    inside the view, and valid_x3 says which box it was; dp_boxes=0 pastes them all."""
    batch = make_batch(b=6, seed=4)
    out = region_stage(batch, torch.Generator().manual_seed(1), RegionConfig(prc=False, prm=False, rbj=False))
    assert torch.equal(out.valid_x3, batch.box_valid)
    cfg = RegionConfig(prc=False, prm=False, rbj=False, dp_boxes=1)
    out = region_stage(batch, torch.Generator().manual_seed(1), cfg)
    assert torch.equal(out.valid_x3.sum(1), batch.box_valid.any(1).long())
    assert not (out.valid_x3 & ~batch.box_valid).any()
    for i in range(6):
        j = int(out.valid_x3[i].nonzero()[0, 0])
        t = (out.boxes_x3[i, j] - batch.boxes2[i, j])[:2].round().long()
        box = out.boxes_x3[i, j]
        assert torch.equal(out.boxes_x3[i], box.expand(4, 4))   # rows left out repeat x3's box
        assert (box >= 0).all() and (box <= 32).all()
        mask = covered(box, 32, 32)
        moved = torch.roll(batch.view2[i], shifts=(int(t[1]), int(t[0])), dims=(1, 2))
        assert torch.equal(out.x3[i][:, mask], moved[:, mask])
        others = [k for k in range(6) if k != i and torch.equal(out.x3[i][:, ~mask], batch.view2[k][:, ~mask])]
        assert len(others) == 1            # everything outside the one box is another image
    # a box in a corner and one in the opposite corner: together they leave no room to move, alone
    # each can move by most of the view
    batch.boxes2[:, 0] = torch.tensor([0.0, 0.0, 8.0, 8.0])
    batch.boxes2[:, 1] = torch.tensor([24.0, 24.0, 32.0, 32.0])
    batch.box_valid[:] = False
    batch.box_valid[:, :2] = True
    shifts = {}
    for n in (0, 1):
        cfg = RegionConfig(prc=False, prm=False, rbj=False, dp_boxes=n)
        outs = [region_stage(batch, torch.Generator().manual_seed(s), cfg) for s in range(10)]
        # every row of x3 moved by the image's one shift (left-out rows repeat a box of x3)
        shifts[n] = torch.stack([(o.boxes_x3[o.valid_x3] - batch.boxes2[o.valid_x3])[:, :2] for o in outs]).abs()
    assert shifts[0].max() == 0 and shifts[1].mean() > 5
    with pytest.raises(ValueError, match="dp_boxes"):
        RegionConfig(dp_boxes=-1)
    with pytest.raises(ValueError, match="dp_boxes"):
        RegionConfig(dp_boxes=1.5)


def test_switches():
    batch = make_batch(seed=3)
    out = region_stage(batch, torch.Generator().manual_seed(0), RegionConfig(depositioning=False, rbj=False))
    assert out.x3 is None and out.boxes_x3 is None
    assert torch.equal(out.boxes_x1, batch.boxes1) and torch.equal(out.boxes_x2s_hat, batch.boxes2 / 2)
    # PRM only, one proposal per image: erased pixels all lie outside it
    batch.box_valid[:, 1:] = False
    out = region_stage(batch, torch.Generator().manual_seed(0), RegionConfig(prc=False))
    inside = torch.stack([covered(batch.boxes1[i, 0], 32, 32) for i in range(6)])
    erased = (out.x1_hat != batch.view1).any(1)
    assert erased.any() and not (erased & inside).any()
    # PRC only: erased pixels all lie inside it
    out = region_stage(batch, torch.Generator().manual_seed(0), RegionConfig(prm=False))
    erased = (out.x1_hat != batch.view1).any(1)
    assert erased.any() and not (erased & ~inside).any()


def test_same_seed_same_views():
    batch = make_batch(seed=4)
    a = region_stage(batch, torch.Generator().manual_seed(9))
    b = region_stage(batch, torch.Generator().manual_seed(9))
    c = region_stage(batch, torch.Generator().manual_seed(10))
    for f in dataclasses.fields(a):
        assert torch.equal(getattr(a, f.name), getattr(b, f.name)), f.name
    assert not torch.equal(a.x1_hat, c.x1_hat)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_device_matches_cpu_with_a_cpu_generator(device, dtype):
    batch = make_batch(seed=5, dtype=dtype)
    ref = region_stage(batch, torch.Generator().manual_seed(1))
    out = region_stage(batch.to(device), torch.Generator().manual_seed(1))
    for f in dataclasses.fields(ref):
        assert torch.equal(getattr(out, f.name).cpu(), getattr(ref, f.name)), f.name


@pytest.mark.cuda
def test_stages_never_wait_for_the_gpu():
    """On a GPU batch with a GPU generator the stages issue no synchronising operation: a blocking
    copy or a read of a GPU value would make the host wait for the work already queued, and the
    trainer runs the next step's stage while the current step still computes."""
    batch = make_batch(seed=7).to("cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    configs = [RegionConfig(), RegionConfig(dp_boxes=1)]
    for cfg in configs:  # the first calls make the samplers' cached constants
        region_stage(batch, g, cfg)
    soco_stage(batch, g)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for cfg in configs:
            region_stage(batch, g, cfg)
        soco_stage(batch, g)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_stages_make_no_tensors_from_python_numbers_once_warm(monkeypatch):
    """What the CUDA test above checks, guarded on any machine: once warm, the stages build no
    tensor from Python numbers (on a GPU each would be a blocking copy that waits for the work
    already queued)."""
    batch = make_batch(seed=3)
    g = torch.Generator().manual_seed(0)
    configs = [RegionConfig(), RegionConfig(dp_boxes=1)]
    for cfg in configs:
        region_stage(batch, g, cfg)
    soco_stage(batch, g)
    calls = []

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)
        return wrapper
    for name in ("tensor", "as_tensor"):
        monkeypatch.setattr(torch, name, counted(name, getattr(torch, name)))
    monkeypatch.setattr(torch.Tensor, "new_tensor", counted("new_tensor", torch.Tensor.new_tensor))
    for cfg in configs:
        region_stage(batch, g, cfg)
    soco_stage(batch, g)
    assert calls == []


def test_sampler_constants_are_shared_and_never_written():
    """The samplers' constants are made once per device and shared, so what a sampler returns must
    never be one of them (a caller writing into its result would change every later draw)."""
    batch = make_batch(b=1)  # one image: the [1,2K] result could be a view of the constant
    boxes, valid = batch.boxes1, batch.box_valid
    a = S.sample_prc(boxes, valid, torch.Generator().manual_seed(0), image_size=32)
    a.erase.fill_(True)
    b = S.sample_prc(boxes, valid, torch.Generator().manual_seed(0), image_size=32)
    assert not b.erase[:, 0].any() and b.erase[:, 1].all()   # restore slots stay restores
    assert S._constant((1, 2), torch.float64, "cpu") is S._constant([1, 2], torch.float64, "cpu")


def test_batch_of_one_uses_itself_as_background():
    batch = make_batch(b=1, seed=6)
    out = region_stage(batch, torch.Generator().manual_seed(0), RegionConfig(prc=False, rbj=False))
    t = (out.boxes_x3 - batch.boxes2)[0, 0, :2].long()
    moved = torch.roll(batch.view2[0], shifts=(int(t[1]), int(t[0])), dims=(1, 2))
    assert ((out.x3[0] == batch.view2[0]) | (out.x3[0] == moved)).all()


def test_soco_stage():
    batch = make_batch(seed=7)
    out = soco_stage(batch, torch.Generator().manual_seed(0))
    assert out.x3 is None and out.boxes_x3 is None
    assert out.boxes_x1 is batch.boxes1 and out.boxes_x2 is batch.boxes2
    assert ((out.x1_hat == batch.view1) | (out.x1_hat == 0)).all()
    assert (out.x1_hat != batch.view1).any()
    for boxes, size in ((out.boxes_x1_hat, 32), (out.boxes_x2s_hat, 16)):
        assert (boxes >= 0).all() and (boxes <= size).all()
        assert (boxes[..., 2] > boxes[..., 0]).all()
    off = soco_stage(batch, torch.Generator().manual_seed(0), SocoAugConfig(cutout=False, jitter=False))
    assert off.x1_hat is batch.view1 and torch.equal(off.boxes_x1_hat, batch.boxes1)

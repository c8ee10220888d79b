"""ResNet-C4 region features and the D3SSL / SoCo method modules (tiny ResNet-18, 64-px views)."""
import dataclasses

import pytest
import torch
import torchvision

from d3ssl.augment.stage import RegionConfig, RegionViews, region_stage, soco_stage
from d3ssl.data.batch import Batch
from d3ssl.model import D3SSL, ModelConfig, ResNetC4, SoCo, build_method
from tests.test_losses import ref_d3ssl

S, B, K = 64, 2, 3


def tiny_cfg(**kw):
    base = dict(arch="resnet18", proj_hidden=32, proj_dim=16, pred_hidden=32, queue_size=64,
                roi_size=4)
    base.update(kw)
    return ModelConfig(**base)


# Tiny tensors: one intra-op thread (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


_BUILT = {}


def fresh_method(max_queue=None, **kw):
    """A method of tiny_cfg(**kw), built once per config (building ResNet-18 twice costs seconds on a
    small CPU) and reset to its initial weights, buffers and train mode on every call."""
    key = (max_queue, tuple(sorted(kw.items())))
    if key not in _BUILT:
        m = build_method(tiny_cfg(**kw), max_queue=max_queue)
        _BUILT[key] = (m, {k: v.clone() for k, v in m.state_dict().items()})
    m, state = _BUILT[key]
    m.load_state_dict(state)
    m.zero_grad(set_to_none=True)
    return m.train()


def rand_boxes(g, s, b=B, k=K):
    xy = torch.rand(b, k, 2, generator=g) * s * 0.5
    wh = torch.rand(b, k, 2, generator=g) * s * 0.4 + s * 0.1
    return torch.cat([xy, xy + wh], dim=-1)


def make_views(seed=0, valid=None, x3=True):
    g = torch.Generator().manual_seed(seed)
    img = lambda s: torch.randn(B, 3, s, s, generator=g).contiguous(memory_format=torch.channels_last)
    if valid is None:
        valid = torch.tensor([[True, True, False], [True, False, True]])
    return RegionViews(
        x1_hat=img(S), x2s_hat=img(S // 2), x3=img(S) if x3 else None, x1=img(S), x2=img(S),
        boxes_x1_hat=rand_boxes(g, S), boxes_x2s_hat=rand_boxes(g, S // 2),
        boxes_x3=rand_boxes(g, S) if x3 else None, boxes_x1=rand_boxes(g, S), boxes_x2=rand_boxes(g, S),
        valid=valid)


# ------------------------------------------------------------------------------------- backbone
def test_resnet_c4_shapes():
    r18 = ResNetC4("resnet18")
    assert (r18.c4_channels, r18.out_channels) == (256, 512)
    assert ResNetC4("resnet50").out_channels == 2048
    x = torch.randn(2, 3, S, S)
    assert r18.c4(x).shape == (2, 256, S // 16, S // 16)
    assert r18.c5(x).shape == (2, 512, S // 32, S // 32)
    with pytest.raises(ValueError, match="arch"):
        ResNetC4("vgg16")


def test_region_features_match_per_box_crop():
    """forward == RoIAlign of each box alone on C4 (stride 16), then res5 and a spatial mean."""
    net = ResNetC4("resnet18").eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 3, S, S, generator=g)
    boxes = rand_boxes(g, S)
    with torch.no_grad():
        got = net(x.contiguous(memory_format=torch.channels_last), boxes, output_size=4)
        c4 = net.c4(x)
        for b in range(B):
            for k in range(K):
                r = torchvision.ops.roi_align(c4[b:b + 1], [boxes[b, k:k + 1]], 4, 1 / 16, -1, True)
                want = net.res5(r).mean(dim=(2, 3))[0]
                torch.testing.assert_close(got[b, k], want, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------- methods
def _eval_reference(m, v, teacher1=None):
    """Per-view features through the plain ResNetC4.forward path (eval mode: BN is per sample).
    teacher1: the image the teacher's view 1 features come from (default v.x1)."""
    s, s2 = m.cfg.roi_size, m.cfg.roi_size // 2
    teacher1 = v.x1 if teacher1 is None else teacher1
    with torch.no_grad():
        st = lambda x, bx, o: m.predictor(m.online_projector(m.online_backbone(x, bx, o).flatten(0, 1)))
        te = lambda x, bx: m.teacher_projector(m.teacher_backbone(x, bx, s).flatten(0, 1))
        return (st(v.x1_hat, v.boxes_x1_hat, s), st(v.x2s_hat, v.boxes_x2s_hat, s2),
                st(v.x3, v.boxes_x3, s), te(teacher1, v.boxes_x1), te(v.x2, v.boxes_x2))


def test_d3ssl_loss_matches_paper_equations():
    m = fresh_method().eval()
    assert isinstance(m, D3SSL)
    g = torch.Generator().manual_seed(7)
    q = torch.nn.functional.normalize(torch.randn(64, 16, generator=g), dim=1)
    m.queue.copy_(q)
    m.queue_filled.fill_(40)                        # only the first 40 slots are negatives
    v = make_views()
    out = m(v)
    feats = [t.double().numpy() for t in _eval_reference(m, v)]
    want_dc, want_dp = ref_d3ssl(*feats, q[:40].double().numpy(), v.valid.reshape(-1).numpy(), 0.2)
    assert out["l_dc"].item() == pytest.approx(want_dc, rel=1e-4)
    assert out["l_dp"].item() == pytest.approx(want_dp, rel=1e-4)
    assert out["loss"].item() == pytest.approx(want_dc + want_dp, rel=1e-4)
    assert int(m.queue_filled) == 40                # eval mode does not enqueue


@pytest.mark.parametrize("teacher_view1", ["x1", "x1_hat"])
def test_teacher_view1_chooses_what_the_teacher_sees(teacher_view1):
    """model.teacher_view1: the teacher's view 1 features come from x1 (default) or from the
    student's erased x1_hat (the paper's eq. 3 as printed), with the teacher's own boxes."""
    m = fresh_method(teacher_view1=teacher_view1).eval()
    g = torch.Generator().manual_seed(8)
    q = torch.nn.functional.normalize(torch.randn(64, 16, generator=g), dim=1)
    m.queue.copy_(q)
    m.queue_filled.fill_(64)
    v = make_views(seed=3)
    out = m(v)
    q = q.double().numpy()
    valid = v.valid.reshape(-1).numpy()
    for image, expect in ((v.x1, teacher_view1 == "x1"), (v.x1_hat, teacher_view1 == "x1_hat")):
        feats = [t.double().numpy() for t in _eval_reference(m, v, teacher1=image)]
        want_dc, want_dp = ref_d3ssl(*feats, q, valid, 0.2)
        assert (out["l_dc"].item() == pytest.approx(want_dc, rel=1e-4)) == expect
        assert (out["l_dp"].item() == pytest.approx(want_dp, rel=1e-4)) == expect
    with pytest.raises(ValueError, match="teacher_view1"):
        ModelConfig(teacher_view1="x2")


def test_padded_boxes_do_not_change_loss_or_gradients():
    m = fresh_method().eval()
    m.queue.copy_(torch.nn.functional.normalize(torch.randn(64, 16), dim=1))
    m.queue_filled.fill_(64)
    v = make_views()
    grads = []
    for shift in (0.0, 9.0):
        moved = {}
        for name in ("boxes_x1_hat", "boxes_x3", "boxes_x1", "boxes_x2"):
            moved[name] = getattr(v, name).clone()
            moved[name][~v.valid] = torch.tensor([shift, shift, shift + 20.0, shift + 30.0])
        w = dataclasses.replace(v, **moved)
        m.zero_grad()
        out = m(w)
        out["loss"].backward()
        grads.append((out["loss"].item(), [p.grad.clone() for p in m.online_backbone.parameters()]))
    assert grads[0][0] == grads[1][0]
    for a, b in zip(grads[0][1], grads[1][1]):
        assert torch.equal(a, b)


def test_teacher_gets_no_gradients_and_student_does():
    m = fresh_method()
    m.queue_filled.fill_(64)
    m(make_views())["loss"].backward()
    for p in m.teacher_parameters():
        assert not p.requires_grad and p.grad is None
    online = list(m.online_backbone.parameters()) + list(m.online_projector.parameters()) + \
        list(m.predictor.parameters())
    assert all(p.grad is not None for p in online)
    assert sum(p.grad.abs().sum() for p in online) > 0


def test_queue_holds_the_steps_valid_teacher_features_with_wraparound():
    m = fresh_method(queue_size=10)
    cfg = m.cfg
    assert m.queue.shape == (10, 16) and int(m.queue_filled) == 0
    seen = []
    for step in range(2):
        v = make_views(seed=step)
        with torch.no_grad():    # train-mode BN: same batch, same features as inside forward
            z_t = m.teacher([v.x1, v.x2], [v.boxes_x1, v.boxes_x2], cfg.roi_size)
        seen.append(torch.nn.functional.normalize(z_t[v.valid.reshape(-1).repeat(2)], dim=1))
        m(v)
    # 8 valid features per step (4 valid boxes x 2 teacher views): step 0 fills slots 0-7,
    # step 1 writes slots 8, 9 then wraps to 0-5.
    new = torch.cat(seen)
    want = torch.empty(10, 16)
    for i, f in enumerate(new):
        want[i % 10] = f
    torch.testing.assert_close(m.queue, want, rtol=1e-5, atol=1e-6)
    assert int(m.queue_ptr) == 16 % 10 and int(m.queue_filled) == 10


def test_queue_is_capped_by_the_data():
    m = fresh_method(queue_size=1000, max_queue=12)
    assert m.queue.shape[0] == 12
    m2 = fresh_method(queue_size=8, max_queue=12)
    assert m2.queue.shape[0] == 8


def test_enqueue_keeps_only_valid_finite_rows():
    m = fresh_method(queue_size=6)
    feats = torch.randn(5, 16)
    feats[1] = float("nan")
    valid = torch.tensor([True, True, False, True, True])
    m.enqueue(feats, valid)
    torch.testing.assert_close(m.queue[:3], torch.nn.functional.normalize(feats[[0, 3, 4]], dim=1))
    assert int(m.queue_filled) == 3 and int(m.queue_ptr) == 3


def test_without_depositioning():
    for kw, v in (({"use_dp": False}, make_views()), ({}, make_views(x3=False))):
        m = fresh_method(**kw)
        m.queue_filled.fill_(64)
        out = m(v)
        assert out["l_dp"].item() == 0 and out["loss"].item() == out["l_dc"].item() > 0


def test_update_teacher_is_an_ema():
    m = fresh_method()
    with torch.no_grad():
        for p in m.online_backbone.parameters():
            p.add_(torch.randn_like(p))
    online = [p.clone() for p in list(m.online_backbone.parameters()) + list(m.online_projector.parameters())]
    teacher = [p.clone() for p in m.teacher_parameters()]
    m.update_teacher(0.9)
    for o, t, new in zip(online, teacher, m.teacher_parameters()):
        torch.testing.assert_close(new, 0.9 * t + 0.1 * o)
    m.update_teacher(0.0)
    for o, new in zip(online, m.teacher_parameters()):
        torch.testing.assert_close(new, o)
    with pytest.raises(ValueError, match="momentum"):
        m.update_teacher(1.5)


def test_soco_byol_pairs():
    m = fresh_method(method="soco").eval()
    assert isinstance(m, SoCo) and not hasattr(m, "queue")
    v = make_views(x3=False)
    out = m(v)
    s, s2 = m.cfg.roi_size, m.cfg.roi_size // 2
    with torch.no_grad():
        p1 = m.predictor(m.online_projector(m.online_backbone(v.x1_hat, v.boxes_x1_hat, s).flatten(0, 1)))
        p3 = m.predictor(m.online_projector(m.online_backbone(v.x2s_hat, v.boxes_x2s_hat, s2).flatten(0, 1)))
        z1 = m.teacher_projector(m.teacher_backbone(v.x1, v.boxes_x1, s).flatten(0, 1))
        z2 = m.teacher_projector(m.teacher_backbone(v.x2, v.boxes_x2, s).flatten(0, 1))
    valid = v.valid.reshape(-1)
    cos = lambda a, b: torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1)
    want = (2 - 2 * cos(p1, z2))[valid].mean() + (2 - 2 * cos(p3, z1))[valid].mean()
    assert out["loss"].item() == pytest.approx(want.item(), rel=1e-4)


def test_bad_config_and_views_are_rejected():
    with pytest.raises(ValueError, match="method"):
        ModelConfig(method="moco")
    with pytest.raises(ValueError, match="roi_size"):
        ModelConfig(roi_size=7)
    m = fresh_method()
    v = make_views()
    v = dataclasses.replace(v, boxes_x2=v.boxes_x2[:, :, :3])
    with pytest.raises(ValueError, match="boxes_x2"):
        m(v)


def test_checkpoint_round_trip_has_the_queue():
    m = fresh_method()
    m(make_views())
    m2 = fresh_method()
    m2.load_state_dict(m.state_dict())
    assert torch.equal(m2.queue, m.queue) and int(m2.queue_filled) == int(m.queue_filled)


@pytest.mark.parametrize("method", ["d3ssl", "soco"])
def test_one_step_from_a_batch_through_the_region_stage(method):
    """Batch -> region stage -> method: a finite loss, gradients in the student, the queue filled."""
    g = torch.Generator().manual_seed(3)
    cl = torch.channels_last
    boxes1, boxes2 = rand_boxes(g, S), rand_boxes(g, S)
    batch = Batch(view1=torch.randn(B, 3, S, S, generator=g).contiguous(memory_format=cl),
                  view2=torch.randn(B, 3, S, S, generator=g).contiguous(memory_format=cl),
                  view2_small=torch.randn(B, 3, S // 2, S // 2, generator=g).contiguous(memory_format=cl),
                  boxes1=boxes1, boxes2=boxes2, box_valid=torch.tensor([[True, True, False], [True] * 3]),
                  image_id=torch.arange(B)).validate()
    m = fresh_method(method=method)
    views = region_stage(batch, g, RegionConfig()) if method == "d3ssl" else soco_stage(batch, g)
    out = m(views)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert m.online_backbone.trunk[0].weight.grad is not None
    if method == "d3ssl":
        assert views.x3 is not None and int(m.queue_filled) == 2 * 5
        assert out["l_dc"].item() == 0.0          # the queue was empty: only positives
        out = m(region_stage(batch, g, RegionConfig()))
        assert out["l_dc"].item() > 0 and out["l_dp"].item() > 0


def _enqueue_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        m = build_method(tiny_cfg(queue_size=8))
        feats = torch.full((3, 16), float(rank + 1))
        feats[:, 0] = torch.arange(3) + 10 * rank          # distinct rows, recognisable after normalising
        valid = torch.tensor([True, rank == 0, True])
        m.enqueue(feats, valid)
        torch.save({"queue": m.queue, "filled": int(m.queue_filled)}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_enqueue_gathers_all_ranks_in_rank_order(tmp_path):
    """Two gloo processes: each rank's queue holds rank 0's valid rows, then rank 1's."""
    import torch.multiprocessing as mp
    mp.spawn(_enqueue_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    q0, q1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert torch.equal(q0["queue"], q1["queue"]) and q0["filled"] == q1["filled"] == 5
    want = []
    for rank, rows in ((0, [0, 1, 2]), (1, [0, 2])):
        for i in rows:
            f = torch.full((16,), float(rank + 1))
            f[0] = i + 10 * rank
            want.append(torch.nn.functional.normalize(f, dim=0))
    torch.testing.assert_close(q0["queue"][:5], torch.stack(want))


def test_enqueue_more_rows_than_slots_keeps_the_latest():
    m = fresh_method(queue_size=4)
    m.enqueue(torch.randn(1, 16), torch.tensor([True]))            # ptr 1
    feats = torch.randn(7, 16)
    valid = torch.tensor([True, False, True, True, True, True, True])
    m.enqueue(feats, valid)
    kept = torch.nn.functional.normalize(feats[valid], dim=1)[-4:]  # the latest 4 of 6
    # kept rows have ranks 2..5 among the 6, written to slots (1 + rank) mod 4 = 3, 0, 1, 2
    torch.testing.assert_close(m.queue[[3, 0, 1, 2]], kept)
    assert int(m.queue_ptr) == (1 + 6) % 4 and int(m.queue_filled) == 4


def test_bf16_autocast_step_is_finite_and_loss_float32():
    m = fresh_method()
    m.queue_filled.fill_(64)
    m.queue.copy_(torch.nn.functional.normalize(torch.randn(64, 16), dim=1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(make_views())
    out["loss"].backward()
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"]) and out["loss"] > 0
    assert m.queue.dtype == torch.float32
    assert all(torch.isfinite(p.grad).all() for p in m.predictor.parameters())


def test_depositioning_loss_covers_only_the_boxes_of_x3():
    """With a subset of boxes in x3 (region.dp_boxes), L_dp averages over that subset and L_dc over
    every valid box; moving a box that is not in x3 leaves L_dp as it is; a padded box marked as in x3
    does not count; a valid_x3 of the wrong shape is refused."""
    m = fresh_method().eval()
    g = torch.Generator().manual_seed(5)
    q = torch.nn.functional.normalize(torch.randn(64, 16, generator=g), dim=1)
    m.queue.copy_(q)
    m.queue_filled.fill_(64)
    valid = torch.tensor([[True, True, True], [True, False, True]])
    valid3 = torch.tensor([[False, True, False], [True, False, False]])
    v = dataclasses.replace(make_views(valid=valid), valid_x3=valid3)
    out = m(v)
    feats = [t.double().numpy() for t in _eval_reference(m, v)]
    want_dc, _ = ref_d3ssl(*feats, q.double().numpy(), valid.reshape(-1).numpy(), 0.2)
    _, want_dp = ref_d3ssl(*feats, q.double().numpy(), valid3.reshape(-1).numpy(), 0.2)
    _, all_dp = ref_d3ssl(*feats, q.double().numpy(), valid.reshape(-1).numpy(), 0.2)
    assert out["l_dc"].item() == pytest.approx(want_dc, rel=1e-4)
    assert out["l_dp"].item() == pytest.approx(want_dp, rel=1e-4)
    assert abs(want_dp - all_dp) > 1e-3           # the subset is what made the difference
    boxes3 = v.boxes_x3.clone()
    boxes3[~valid3] = torch.tensor([1.0, 2.0, 30.0, 40.0])
    moved = m(dataclasses.replace(v, boxes_x3=boxes3))
    assert moved["l_dp"].item() == out["l_dp"].item()
    padded_too = m(dataclasses.replace(v, valid_x3=valid3 | ~valid))
    assert padded_too["l_dp"].item() == out["l_dp"].item()
    with pytest.raises(ValueError, match="valid_x3 must be bool"):
        m(dataclasses.replace(v, valid_x3=valid3[:, :2]))

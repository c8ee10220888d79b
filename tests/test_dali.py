"""The DALI loader backend (d3ssl.data.dali), run here in DALI's CPU-only mode (device_id=None).

Every reference is independent of DALI: OpenCV decodes, the view sampler called directly, the CPU
loader. Images are tiny and views are 64 px so the whole file runs in seconds.
"""
import io
import os
import re
import warnings

import cv2
import numpy as np
import pytest
import torch

from d3ssl.data import dali as dali_mod
from d3ssl.data.batch import IMAGENET_MEAN, IMAGENET_STD
from d3ssl.data.colour import ColourConfig
from d3ssl.data.datasets import ImageFolder
from d3ssl.data.loader import make_loader
from d3ssl.data.proposals import ProposalStore, write_store
from d3ssl.data.views import ViewConfig, sample_seed, sample_views
from tests.conftest import ROOT

needs_dali = pytest.mark.skipif(not dali_mod.dali_available(),
                                reason="NVIDIA DALI is not installed (pip install -e .[dali])")

S = 64
VIEW = ViewConfig(size=S, min_box_size=4.0)
NO_COLOUR = ColourConfig(enabled=False)
# distinct, saturated colours for the proposal regions; the background is mid-gray
PALETTE = np.array([[230, 30, 30], [30, 200, 40], [40, 60, 230], [240, 220, 20], [200, 40, 220],
                    [20, 210, 220]], np.uint8)
BACKGROUND = 128


def _regions(w, h, rng):
    """Up to 6 disjoint rectangles (x1,y1,x2,y2, integer pixels) on a 3x2 grid of cells."""
    boxes = []
    for j in range(6):
        cx, cy = j % 3, j // 3
        x0, x1 = cx * w // 3, (cx + 1) * w // 3
        y0, y1 = cy * h // 2, (cy + 1) * h // 2
        bw, bh = int((x1 - x0) * rng.uniform(0.55, 0.85)), int((y1 - y0) * rng.uniform(0.55, 0.85))
        bx, by = x0 + int(rng.integers(0, x1 - x0 - bw + 1)), y0 + int(rng.integers(0, y1 - y0 - bh + 1))
        boxes.append([bx, by, bx + bw, by + bh])
    return np.array(boxes, np.float32)


def _render(w, h, boxes):
    img = np.full((h, w, 3), BACKGROUND, np.uint8)
    for j, (x1, y1, x2, y2) in enumerate(boxes.astype(int)):
        img[y1:y2, x1:x2] = PALETTE[j]
    return img


def _write_dataset(root, n=10, seed=0, extra=()):
    """n coloured-region JPEGs (quality 100) of varied sizes, plus `extra` (name, bytes) files, and a
    proposals store whose proposals are exactly the coloured regions."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    truth = {}
    for i in range(n):
        w, h = int(rng.integers(90, 160)), int(rng.integers(80, 140))
        boxes = _regions(w, h, rng)
        img = _render(w, h, boxes)
        cv2.imwrite(os.path.join(root, f"img{i:02d}.jpg"), img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 100])
        truth[f"img{i:02d}.jpg"] = (w, h, boxes)
    for name, data in extra:
        with open(os.path.join(root, name), "wb") as f:
            f.write(data)
    ds = ImageFolder(root)
    boxes, sizes = [], []
    for i in range(len(ds)):
        w, h, b = truth.get(ds.key(i), (0, 0, np.array([[0, 0, 8, 8]], np.float32)))
        boxes.append(b)
        sizes.append((w, h))
    path = os.path.join(root, "..", os.path.basename(root) + ".proposals")
    write_store(path, ds.keys, boxes, np.array(sizes), np.zeros(len(ds), np.uint8))
    return ds, ProposalStore(path), truth


@pytest.fixture(scope="module", autouse=True)
def _opencv_without_thread_pool():
    # These tests run OpenCV in this process (the CPU loader with workers=0) and fork workers. OpenCV's
    # thread pool does not survive a fork: a child that calls cv2.setNumThreads (as CPU loader
    # workers do) waits forever for threads it does not have. One thread here means no pool to
    # inherit; the old setting is restored after the module (the pool restarts only when used).
    old = cv2.getNumThreads()
    cv2.setNumThreads(1)
    yield
    cv2.setNumThreads(old)


@pytest.fixture(autouse=True)
def _stop_dali_after_each_test():
    # DALI's threads must not outlive the test: later tests fork loader workers, and a fork taken
    # while DALI threads run can deadlock the child
    yield
    dali_mod.close_all_loaders()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _write_dataset(str(tmp_path_factory.mktemp("dali") / "images"))


def _dali(ds, store, **kw):
    kw = {"batch_size": 4, "workers": 1, "view_cfg": VIEW, "seed": 3, "device": "cpu", **kw}
    return make_loader(ds, store, backend="dali", **kw)


def _epoch(loader):
    return list(loader)


def _pixels(view):
    """Normalised [B,3,H,W] -> uint8-scale float64 [B,H,W,3] RGB."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64) * 255
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64) * 255
    return (view.permute(0, 2, 3, 1).double() * std + mean).numpy()


# ------------------------------------------------------------------------------------------------

def test_probe_image_sizes_and_corruption():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (37, 53, 3), np.uint8)
    jpg = cv2.imencode(".jpg", img)[1].tobytes()
    png = cv2.imencode(".png", img)[1].tobytes()
    gray = cv2.imencode(".jpg", img[..., 0])[1].tobytes()
    bmp = cv2.imencode(".bmp", img)[1].tobytes()
    for data in (jpg, png, gray, bmp):
        ref = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        assert dali_mod.probe_image(data) == (ref.shape[1], ref.shape[0])
    # EXIF orientation 6 (rotate 90°): decoders transpose the image, so must the probe
    from PIL import Image
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", exif=exif)
    rotated = buf.getvalue()
    ref = cv2.imdecode(np.frombuffer(rotated, np.uint8), cv2.IMREAD_COLOR)
    assert ref.shape[:2] == (53, 37)
    assert dali_mod.probe_image(rotated) == (37, 53)
    for bad in (jpg[:len(jpg) // 2], jpg[:40], png[:len(png) - 20], b"not an image at all, just text",
                bytes(rng.integers(0, 255, 300, np.uint8))):
        with pytest.raises(dali_mod.CorruptImage):
            dali_mod.probe_image(bad)


@needs_dali
def test_batch_contract(data):
    ds, store, _ = data
    loader = _dali(ds, store, drop_last=False)
    batches = _epoch(loader)
    assert len(batches) == len(loader) == 3          # 10 images, batch 4, last one short
    assert [b.size for b in batches] == [4, 4, 2]
    for b in batches:
        b.validate()
        for v in (b.view1, b.view2, b.view2_small):
            assert v.dtype == torch.float32 and v.device.type == "cpu"
            assert v.is_contiguous(memory_format=torch.channels_last)
            assert torch.isfinite(v).all()
        assert b.view1.shape[1:] == (3, S, S) and b.view2_small.shape[1:] == (3, S // 2, S // 2)
        assert b.boxes1.shape[1:] == (VIEW.num_boxes, 4) and b.box_valid.dtype == torch.bool
        assert b.box_valid[:, 0].all()
        # the permuted NHWC buffer itself: no copy was made to get channels_last
        assert b.view1.permute(0, 2, 3, 1).is_contiguous()
    ids = torch.cat([b.image_id for b in batches])
    assert sorted(ids.tolist()) == list(range(len(ds)))


@needs_dali
def test_views_handed_over_without_copy_stay_valid(data):
    """The views are DALI's own output buffers (no copy on the torch side): a batch kept by the caller
    must not change while the loader runs on, through the rest of the epoch and the next one."""
    ds, store, _ = data
    loader = _dali(ds, store, drop_last=False, seed=4)
    kept, copies = [], []
    for b in loader:
        kept.append(b)
        copies.append([getattr(b, f).clone() for f in ("view1", "view2", "view2_small")])
    later = _epoch(loader)                                   # the next epoch: other samples, other pixels
    assert not torch.equal(later[0].view1, kept[0].view1)
    for b, c in zip(kept, copies, strict=True):
        for f, v in zip(("view1", "view2", "view2_small"), c):
            assert torch.equal(getattr(b, f), v), f


@needs_dali
def test_view2_small_is_the_2x2_average_of_view2(data):
    """view2_small is view2 halved by averaging 2x2 blocks, as the CPU loader's INTER_AREA does at
    this factor: not a wider antialiasing filter. Reference: float64 block means of DALI's own view2,
    in uint8 units; DALI rounds the halved image to uint8 before normalising, hence 0.5 + float slack."""
    ds, store, _ = data
    for colour in (NO_COLOUR, ColourConfig()):
        for b in _epoch(_dali(ds, store, colour_cfg=colour, drop_last=False, seed=6)):
            v2 = _pixels(b.view2)
            blocks = v2.reshape(b.size, S // 2, 2, S // 2, 2, 3).mean(axis=(2, 4))
            err = np.abs(_pixels(b.view2_small) - blocks)
            assert err.max() <= 0.5 + 1e-3, err.max()


@needs_dali
def test_graph_cut_after_each_stage(data):
    """loader.pipeline(upto=...) (benchmarks/breakdown.py --what dali times it) is the loader's own
    graph stopped after a stage: the source hands over the files' bytes, the decode has each image's
    size, the uint8 views before colour equal the colour cut's when colour is off, and the whole
    graph gives the loader's batch."""
    ds, store, truth = data
    loader = _dali(ds, store, colour_cfg=NO_COLOUR, seed=5)
    first = next(iter(_dali(ds, store, colour_cfg=NO_COLOUR, seed=5)))
    ids = first.image_id.tolist()

    def samples(tl):
        return [np.array(tl.at(i)) for i in range(len(tl))]

    out = {}
    for stage in dali_mod.GRAPH_STAGES:
        pipe = loader.pipeline(upto=stage)
        out[stage] = [samples(tl) for tl in pipe.run()]
        del pipe
    encoded, params, kernel1, kernel2, meta = out["source"]
    assert [m[-1] for m in meta] == ids
    assert [e.tobytes() for e in encoded] == [ds.read_bytes(i) for i in ids]
    image, meta = out["decode"]
    assert [im.shape for im in image] == [(truth[ds.key(i)][1], truth[ds.key(i)][0], 3) for i in ids]
    for cut in ("resize", "colour"):
        views = out[cut][:3]
        assert [v.shape for v in views[0] + views[1]] == [(S, S, 3)] * (2 * len(ids))
        assert all(v.shape == (S // 2, S // 2, 3) and v.dtype == np.uint8 for v in views[2])
    for a, b in zip(out["resize"][:3], out["colour"][:3]):
        assert all(np.array_equal(x, y) for x, y in zip(a, b))
    for k, name in enumerate(("view1", "view2", "view2_small")):
        want = getattr(first, name).permute(0, 2, 3, 1).numpy()
        got = np.stack(out["normalise"][k])
        assert got.dtype == np.float32 and np.array_equal(got, want), name
    with pytest.raises(ValueError, match="upto must be one of"):
        loader.pipeline(upto="resized")


@needs_dali
def test_boxes_land_on_their_regions(data):
    """Colour augmentation off: inside every valid box, view 1, view 2 and view2_small show the
    colour of that box's proposal, and the boxes are the view sampler's for the sample's seed."""
    ds, store, truth = data
    loader = _dali(ds, store, colour_cfg=NO_COLOUR, drop_last=False, seed=11)
    checked = 0
    for b in _epoch(loader):
        for n in range(b.size):
            i = int(b.image_id[n])
            w, h, regions = truth[ds.key(i)]
            vp = sample_views(w, h, regions, np.random.default_rng(sample_seed(11, 0, i)), VIEW)
            np.testing.assert_allclose(b.boxes1[n].numpy(), vp.boxes1, atol=1e-4)
            np.testing.assert_allclose(b.boxes2[n].numpy(), vp.boxes2, atol=1e-4)
            assert b.box_valid[n].tolist() == vp.valid.tolist()
            # which region is row k: the region whose view-1 box (flip undone) it is
            x1 = vp.boxes1[:, [0, 2]] if not vp.flip1 else S - vp.boxes1[:, [2, 0]]
            centre = np.stack([x1.mean(1) * w / S, vp.boxes1[:, [1, 3]].mean(1) * h / S], 1)
            inside = ((centre[:, None, 0] > regions[None, :, 0]) & (centre[:, None, 0] < regions[None, :, 2])
                      & (centre[:, None, 1] > regions[None, :, 1]) & (centre[:, None, 1] < regions[None, :, 3]))
            for view, boxes, scale in ((b.view1, b.boxes1, 1), (b.view2, b.boxes2, 1),
                                       (b.view2_small, b.boxes2, 0.5)):
                px = _pixels(view[n:n + 1])[0]
                for k in np.nonzero(vp.valid)[0]:
                    x1b, y1b, x2b, y2b = (boxes[n, k].numpy() * scale).tolist()
                    # the box's interior, 2 px in from its edges (resampling blends the edges)
                    xa, xb = int(np.ceil(x1b)) + 2, int(np.floor(x2b)) - 2
                    ya, yb = int(np.ceil(y1b)) + 2, int(np.floor(y2b)) - 2
                    if xb <= xa or yb <= ya:
                        continue
                    colour = px[ya:yb, xa:xb].reshape(-1, 3).mean(0)
                    expect = PALETTE[int(np.argmax(inside[k]))]
                    assert np.abs(colour - expect).max() < 12, (i, k, colour, expect)
                    checked += 1
    assert checked > 30


@needs_dali
def test_geometry_matches_cpu_loader(data):
    """Same seed, colour off: DALI's views are the CPU loader's (same windows, same flips, same boxes)
    up to the two resamplers' differences, which on these flat regions live only at the edges."""
    ds, store, _ = data
    kw = dict(batch_size=4, view_cfg=VIEW, colour_cfg=NO_COLOUR, seed=5, drop_last=False)
    cpu = make_loader(ds, store, backend="cpu", workers=0, **kw)
    dali = make_loader(ds, store, backend="dali", workers=1, device="cpu", **kw)
    for epoch in (0, 1):
        cpu.set_epoch(epoch)
        dali.set_epoch(epoch)
        for a, b in zip(cpu, dali, strict=True):
            assert torch.equal(a.image_id, b.image_id)
            assert torch.equal(a.boxes1, b.boxes1) and torch.equal(a.boxes2, b.boxes2)
            assert torch.equal(a.box_valid, b.box_valid)
            for name in ("view1", "view2", "view2_small"):
                pa, pb = _pixels(getattr(a, name)), _pixels(getattr(b, name))
                diff = np.abs(pa - pb)
                # a mirrored or shifted window would differ by ~100 levels over whole regions
                assert diff.mean() < 4.0, (name, diff.mean())
                assert (diff > 40).mean() < 0.03, (name, (diff > 40).mean())


def test_gaussian_taps_are_opencvs():
    for sigma in (0.1, 0.7, 1.3, 2.0):
        taps = dali_mod.gaussian_kernel(sigma)
        k = int(round(sigma * 6 + 1)) | 1
        np.testing.assert_allclose(taps.ravel(), cv2.getGaussianKernel(k, sigma).ravel(), atol=1e-6)


def _first_batch(data, backend, colour_cfg):
    ds, store, _ = data
    extra = dict(workers=0) if backend == "cpu" else dict(workers=1, device="cpu")
    return next(iter(make_loader(ds, store, backend=backend, colour_cfg=colour_cfg, batch_size=5,
                                 view_cfg=VIEW, seed=2, drop_last=True, **extra)))


@pytest.fixture(scope="module")
def plain_first(data):
    return {backend: _first_batch(data, backend, NO_COLOUR) for backend in ("cpu", "dali")}


_ONLY = dict(jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0), solarize_p=(0.0, 0.0))


@pytest.mark.parametrize("name,cfg,tol", [
    ("grayscale", ColourConfig(**{**_ONLY, "grayscale_p": 1.0}), 1.5),
    ("solarize", ColourConfig(**{**_ONLY, "solarize_p": (1.0, 1.0)}), 1.5),
    # sigmas in pixels of these small views (unscaled), so that the blur has a measurable effect
    ("blur", ColourConfig(**{**_ONLY, "blur_p": (1.0, 1.0), "blur_reference_size": VIEW.size}), 1.5),
    ("brightness", ColourConfig(**{**_ONLY, "jitter_p": 1.0, "contrast": 0.0, "saturation": 0.0,
                                   "hue": 0.0}), 1.5),
    ("saturation", ColourConfig(**{**_ONLY, "jitter_p": 1.0, "brightness": 0.0, "contrast": 0.0,
                                   "hue": 0.0, "saturation": 0.8}), 1.5),
    # DALI's contrast pivots on mid-gray, the CPU loader's (torchvision's) on the image's mean gray
    ("contrast", ColourConfig(**{**_ONLY, "jitter_p": 1.0, "brightness": 0.0, "saturation": 0.0,
                                 "hue": 0.0}), 3.0),
])
@needs_dali
def test_colour_ops_match_cpu_loader(data, plain_first, name, cfg, tol):
    """One colour operation at a time, drawn identically by both loaders: what DALI's operator changes
    in a view (against DALI's colour-off view) is what the CPU loader's OpenCV operation changes
    (against its colour-off view), so the resamplers' differences cancel out."""
    cpu, cpu_plain = _first_batch(data, "cpu", cfg), plain_first["cpu"]
    dali, dali_plain = _first_batch(data, "dali", cfg), plain_first["dali"]
    for view in ("view1", "view2"):
        change_cpu = _pixels(getattr(cpu, view)) - _pixels(getattr(cpu_plain, view))
        change_dali = _pixels(getattr(dali, view)) - _pixels(getattr(dali_plain, view))
        err, effect = np.abs(change_cpu - change_dali).mean(), np.abs(change_cpu).mean()
        assert err < tol and effect > 4 * err, (name, view, err, effect)
    if name == "grayscale":
        px = _pixels(dali.view1)
        assert np.abs(px[..., 0] - px[..., 1]).max() < 2 and np.abs(px[..., 1] - px[..., 2]).max() < 2


def _hue_degrees(px):
    hsv = cv2.cvtColor(np.clip(np.rint(px), 0, 255).astype(np.uint8).reshape(-1, 1, 3), cv2.COLOR_RGB2HSV_FULL)
    return hsv[:, 0, 0].astype(np.float64) * 360 / 256, hsv[:, 0, 1]


@needs_dali
def test_hue_rotates_like_cpu_loader(data):
    """DALI rotates hue in YIQ, the CPU loader in HSV, so pixels differ on saturated colours; the hue
    angle each pixel is turned by must still agree (same draw, same direction, similar amount)."""
    ds, store, _ = data
    cfg = ColourConfig(**{**_ONLY, "jitter_p": 1.0, "brightness": 0.0, "saturation": 0.0, "contrast": 0.0})
    kw = dict(batch_size=5, view_cfg=VIEW, seed=2, drop_last=True)
    a = next(iter(make_loader(ds, store, backend="cpu", workers=0, colour_cfg=cfg, **kw)))
    b = next(iter(make_loader(ds, store, backend="dali", workers=1, device="cpu", colour_cfg=cfg, **kw)))
    plain = next(iter(make_loader(ds, store, backend="cpu", workers=0, colour_cfg=NO_COLOUR, **kw)))
    h0, sat = _hue_degrees(_pixels(plain.view1))
    ha, _ = _hue_degrees(_pixels(a.view1))
    hb, _ = _hue_degrees(_pixels(b.view1))
    coloured = sat > 100

    def turn(x, y):
        return (y - x + 180) % 360 - 180
    cpu_turn, dali_turn = turn(h0, ha)[coloured], turn(h0, hb)[coloured]
    assert np.abs(cpu_turn).mean() > 5                                   # the draws do turn hues
    assert np.abs(dali_turn - cpu_turn).mean() < 0.5 * np.abs(cpu_turn).mean()


@needs_dali
@pytest.mark.parametrize("drop_last", [False, True])
def test_sharding_covers_the_epoch_once(data, drop_last):
    ds, store, _ = data
    world = 3
    per_rank = []
    for rank in range(world):
        loader = _dali(ds, store, batch_size=2, rank=rank, world_size=world, drop_last=drop_last, seed=9)
        loader.set_epoch(2)
        ids = [b.image_id.tolist() for b in loader]
        assert len(ids) == len(loader)
        cpu = make_loader(ds, store, backend="cpu", workers=0, batch_size=2, view_cfg=VIEW, rank=rank,
                          world_size=world, drop_last=drop_last, seed=9)
        cpu.sampler.set_epoch(2)
        assert ids == [[i for i, _ in batch] for batch in cpu.sampler]   # the CPU loader's batches
        per_rank.append([i for batch in ids for i in batch])
    seen = [i for ids in per_rank for i in ids]
    assert len(seen) == len(set(seen))                                   # nothing repeated
    if drop_last:
        assert len({len(ids) for ids in per_rank}) == 1                  # DDP: same count per rank
        assert len(seen) == len(ds) // world // 2 * 2 * world
    else:
        assert sorted(seen) == list(range(len(ds)))                      # nothing dropped


@needs_dali
def test_spawned_workers_give_the_same_batches(data, monkeypatch):
    """The source workers start with spawn where fork is unsafe (the CUDA driver initialised in this
    process, as on any machine with a GPU once torch has looked for it); the batches do not depend
    on it."""
    ds, store, _ = data
    forked = _dali(ds, store, seed=5)
    assert forked._start_method() == "fork"
    monkeypatch.setattr(dali_mod, "cuda_driver_initialized", lambda: True)
    spawned = _dali(ds, store, seed=5)
    assert spawned._start_method() == "spawn"
    assert _dali(ds, store, seed=5, start_method="fork")._start_method() == "fork"  # an explicit choice stays
    a, b = _epoch(forked), _epoch(spawned)
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        for f in ("view1", "view2", "view2_small", "boxes1", "boxes2", "box_valid", "image_id"):
            assert torch.equal(getattr(x, f), getattr(y, f)), f


@needs_dali
def test_same_seed_same_batches_and_resume(data):
    """Colour augmentation on. The same seed gives the same batches; epoch 1 of an uninterrupted run
    equals epoch 1 of a loader started there (resume); another seed or epoch gives others."""
    ds, store, _ = data
    run = _dali(ds, store, seed=21)
    e0, e1 = _epoch(run), _epoch(run)          # iterating moves on to the next epoch
    again = _dali(ds, store, seed=21)
    same0 = _epoch(again)
    resumed = _dali(ds, store, seed=21, workers=2)
    resumed.set_epoch(1)
    same1 = _epoch(resumed)
    other = _epoch(_dali(ds, store, seed=22))

    def equal(xs, ys):
        return all(torch.equal(getattr(x, f), getattr(y, f)) for x, y in zip(xs, ys, strict=True)
                   for f in ("view1", "view2", "view2_small", "boxes1", "boxes2", "box_valid", "image_id"))

    assert equal(e0, same0) and equal(e1, same1)
    assert not equal(e0, e1) and not equal(e0, other)
    # colour augmentation is on: some view differs from the colour-off rendering of the same sample
    plain = _epoch(_dali(ds, store, seed=21, colour_cfg=NO_COLOUR))
    assert not equal(e0, plain)
    assert all(torch.equal(x.boxes2, y.boxes2) for x, y in zip(e0, plain))  # colour never moves boxes


@needs_dali
def test_grayscale_cmyk_png_and_corrupt_files(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(1)
    img = cv2.GaussianBlur(rng.integers(0, 255, (70, 90, 3), np.uint8), (0, 0), 2)
    cmyk = io.BytesIO()
    Image.fromarray(img).convert("CMYK").save(cmyk, "JPEG")
    good = cv2.imencode(".jpg", img)[1].tobytes()
    extra = [("gray.jpg", cv2.imencode(".jpg", img[..., 1])[1].tobytes()), ("cmyk.jpg", cmyk.getvalue()),
             ("rgb.png", cv2.imencode(".png", img)[1].tobytes()),
             ("truncated.jpg", good[:len(good) // 2]), ("garbage.jpg", b"\x00" * 64 + b"not a jpeg")]
    ds, store, _ = _write_dataset(str(tmp_path / "images"), n=3, extra=extra)
    loader = _dali(ds, store, batch_size=4, drop_last=False, shuffle=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = _epoch(loader)
    assert sorted(loader.skipped_keys) == ["garbage.jpg", "truncated.jpg"]
    assert any("unreadable" in str(w.message) for w in caught)
    ids = torch.cat([b.image_id for b in batches]).tolist()
    assert len(ids) == len(ds)                                   # batches keep their size
    bad = {ds.keys.index("garbage.jpg"), ds.keys.index("truncated.jpg")}
    assert not bad & set(ids)                                    # replaced by readable images
    for b in batches:
        b.validate()
        assert torch.isfinite(b.view1).all() and torch.isfinite(b.view2).all()
    # grayscale and CMYK come out as 3-channel RGB views matching OpenCV's decode
    cpu = make_loader(ds, store, backend="cpu", workers=0, batch_size=4, view_cfg=VIEW, colour_cfg=NO_COLOUR,
                      drop_last=False, shuffle=False, seed=3)
    dali = _dali(ds, store, batch_size=4, drop_last=False, shuffle=False, colour_cfg=NO_COLOUR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pairs = list(zip(cpu, dali))
    for a, b in pairs:
        # the same geometry in both loaders, also where a replacement fills an unreadable file's slot
        # (drawn with that slot's seed in both)
        assert torch.equal(a.image_id, b.image_id) and torch.equal(a.boxes2, b.boxes2.to(a.boxes2.dtype))
        for n, i in enumerate(a.image_id.tolist()):
            if ds.key(i) in ("gray.jpg", "cmyk.jpg", "rgb.png"):
                diff = np.abs(_pixels(a.view1[n:n + 1]) - _pixels(b.view1[n:n + 1]))
                assert diff.mean() < 6.0, (ds.key(i), diff.mean())


def _bad_huffman_jpeg():
    """A JPEG whose header and end marker are fine but whose Huffman table is impossible: it passes
    the header check and fails in the decoder."""
    jpg = bytearray(cv2.imencode(".jpg", np.full((48, 64, 3), 100, np.uint8))[1].tobytes())
    at = jpg.find(b"\xff\xc4")
    jpg[at + 5:at + 21] = b"\xff" * 16
    data = bytes(jpg)
    dali_mod.probe_image(data)
    return data


@needs_dali
def test_file_failing_in_the_decoder_skips_its_batch_not_the_run(tmp_path):
    ds, store, _ = _write_dataset(str(tmp_path / "images"), n=7, extra=[("zz_bad_huffman.jpg", _bad_huffman_jpeg())])
    bad = ds.keys.index("zz_bad_huffman.jpg")
    loader = _dali(ds, store, batch_size=2, drop_last=False, shuffle=False)   # batches [0,1] .. [6,7]
    with pytest.warns(RuntimeWarning, match="could not process batch 3"):
        first = _epoch(loader)
    assert loader.failed_batches == 1
    assert [b.image_id.tolist() for b in first] == [[0, 1], [2, 3], [4, 5]]
    assert bad == 7
    with pytest.warns(RuntimeWarning, match="could not process batch 3"):
        second = _epoch(loader)                  # the next epoch runs, and fails on the same batch
    assert [b.image_id.tolist() for b in second] == [[0, 1], [2, 3], [4, 5]]
    # a trial decode in the source workers replaces the file instead, as the CPU loader does
    checked = _dali(ds, store, batch_size=2, drop_last=False, shuffle=False, check="decode")
    with pytest.warns(RuntimeWarning, match="unreadable"):
        ids = [b.image_id.tolist() for b in checked]
    assert checked.failed_batches == 0 and checked.skipped_keys == ["zz_bad_huffman.jpg"]
    assert ids[-1] == [6, 0]


@needs_dali
def test_an_epoch_stopped_after_a_failed_batch_starts_over(tmp_path):
    """A batch DALI failed on rebuilt the pipeline mid-epoch and marked it as the epoch's start: a
    caller that stopped early and iterated the same epoch again resumed it, losing samples and
    reporting readable files as unreadable."""
    ds, store, _ = _write_dataset(str(tmp_path / "images"), n=9, extra=[("img01b.jpg", _bad_huffman_jpeg())])
    loader = _dali(ds, store, batch_size=2, drop_last=False, shuffle=False)    # index 2 is the bad file
    with pytest.warns(RuntimeWarning, match="could not process batch 1"):
        first = [b.image_id.tolist() for _, b in zip(range(2), loader)]
    assert first == [[0, 1], [4, 5]] and loader.epoch == 0
    with pytest.warns(RuntimeWarning, match="could not process batch 1"):
        again = [b.image_id.tolist() for b in loader]
    assert again == [[0, 1], [4, 5], [6, 7], [8, 9]] and loader.skipped_keys == []


@needs_dali
def test_a_dataset_the_dali_source_gives_up_on_raises_unreadable_data(tmp_path):
    """DALI passes an error raised in its source workers on as a plain Exception; the loader gives
    it back its type and message, as the CPU loader raises it (the trainer's one-line error)."""
    from d3ssl.data.datasets import UnreadableData
    ds, store, _ = _write_dataset(str(tmp_path / "images"), n=0, extra=[(f"{i}.jpg", b"\0" * 100) for i in range(6)])
    loader = _dali(ds, store, batch_size=2, drop_last=False, shuffle=False)
    with pytest.raises(UnreadableData, match=r"^6 unreadable images in a row \(last: '\d.jpg'\): is the dataset path"):
        _epoch(loader)


def test_a_png_with_bytes_after_its_end_is_not_corrupt():
    png = cv2.imencode(".png", np.full((20, 30, 3), 7, np.uint8))[1].tobytes()
    assert dali_mod.probe_image(png + b"\0" * 40) == (30, 20)
    with pytest.raises(dali_mod.CorruptImage):
        dali_mod.probe_image(png[:len(png) - 12])


def test_missing_dali_says_how_to_install(data, monkeypatch):
    ds, store, _ = data
    monkeypatch.setattr(dali_mod, "_DALI_IMPORT_ERROR", ImportError("No module named 'nvidia.dali'"))
    with pytest.raises(dali_mod.DaliUnavailable, match=re.escape("pip install -e .[dali]")) as e:
        make_loader(ds, store, backend="dali", batch_size=4)
    assert "backend='cpu'" in str(e.value)


def test_nothing_else_imports_dali():
    offenders = []
    for folder in ("d3ssl", "train"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in files:
                path = os.path.join(dirpath, name)
                if name.endswith(".py") and path != os.path.abspath(dali_mod.__file__):
                    with open(path) as f:
                        if re.search(r"^\s*(from|import)\s+nvidia\.dali", f.read(), re.M):
                            offenders.append(path)
    assert not offenders


@needs_dali
@pytest.mark.cuda
def test_gpu_graph_matches_cpu_graph(data):
    """The same graph on the GPU (decode on device="mixed"): fp16 views on the GPU, the same samples
    and boxes as CPU mode, and pixels within decoder/resampler tolerance."""
    ds, store, _ = data
    cpu = _epoch(_dali(ds, store, colour_cfg=NO_COLOUR, drop_last=False))
    gpu_loader = _dali(ds, store, colour_cfg=NO_COLOUR, drop_last=False, device="cuda")
    gpu = _epoch(gpu_loader)
    for a, b in zip(cpu, gpu, strict=True):
        b.validate()
        assert b.view1.device.type == "cuda" and b.view1.dtype == torch.float16
        assert torch.equal(a.image_id, b.image_id.cpu()) and torch.equal(a.boxes2, b.boxes2.cpu())
        for name in ("view1", "view2", "view2_small"):
            diff = np.abs(_pixels(getattr(a, name)) - _pixels(getattr(b, name).float().cpu()))
            assert diff.mean() < 3.0, (name, diff.mean())
    bf16 = next(iter(_dali(ds, store, device="cuda", dtype=torch.bfloat16)))
    assert bf16.view1.dtype == torch.bfloat16 and bf16.view1.is_contiguous(memory_format=torch.channels_last)


@needs_dali
@pytest.mark.cuda
def test_gpu_colour_matches_cpu_colour(data):
    """Every colour operation on at once (each view jittered, gray, blurred and solarized by the
    recipe's draws, the same draws on both devices): what the GPU graph's colour operators change in
    a view is what the CPU graph's change, so the colour stage is the same on both devices (the
    decoders' and resamplers' differences cancel out against each device's colour-off views)."""
    ds, store, _ = data
    on = ColourConfig(jitter_p=1.0, grayscale_p=0.3, blur_p=(1.0, 0.5), solarize_p=(0.3, 0.5),
                      blur_reference_size=VIEW.size)
    batches = {}
    for device in ("cpu", "cuda"):
        for name, cfg in (("on", on), ("off", NO_COLOUR)):
            batches[device, name] = _epoch(_dali(ds, store, colour_cfg=cfg, drop_last=False, device=device))
    for i, (cpu_on, cpu_off, gpu_on, gpu_off) in enumerate(zip(
            batches["cpu", "on"], batches["cpu", "off"], batches["cuda", "on"], batches["cuda", "off"], strict=True)):
        assert torch.equal(cpu_on.image_id, gpu_on.image_id.cpu())
        for view in ("view1", "view2", "view2_small"):
            def change(a, b):
                return _pixels(getattr(a, view).float().cpu()) - _pixels(getattr(b, view).float().cpu())
            change_cpu, change_gpu = change(cpu_on, cpu_off), change(gpu_on, gpu_off)
            err, effect = np.abs(change_cpu - change_gpu).mean(), np.abs(change_cpu).mean()
            assert err < 3.0 and effect > 4 * err, (i, view, err, effect)


def test_source_workers_leave_stop_signals_to_the_training_process(data):
    """In one of DALI's source workers (another process than the one that made the source), the
    source defers SIGTERM and SIGINT from its first call (d3ssl.data.cpu_loader.defer_stop_signals):
    a signal to the whole process group must not end the workers before the training process has
    saved and shut them down."""
    import signal

    from d3ssl.data.cpu_loader import EpochBatchSampler
    dataset, store, _ = data
    source = dali_mod.ViewSource(dataset, store, ViewConfig(size=64), ColourConfig(),
                                 EpochBatchSampler(len(dataset), 4, seed=0), seed=0, start_epoch=0)
    info = type("BatchInfo", (), {"epoch_idx": 0, "iteration": 0})()
    stops = (signal.SIGTERM, signal.SIGINT)
    before = {s: signal.getsignal(s) for s in (*stops, signal.SIGALRM)}
    try:
        source(info)                                  # in the process that made it: untouched
        assert all(signal.getsignal(s) == h for s, h in before.items())
        source._owner = -1                            # as if in a worker
        outputs = source(info)
        assert all(getattr(signal.getsignal(s), "__name__", None) == "on_stop" for s in stops)
        assert len(outputs[0]) == 4                   # and it still makes the batch
    finally:
        for s, h in before.items():
            signal.signal(s, h)


import os

import cv2
import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF

from d3ssl.data import Batch, ColourConfig, ImageFolder, ViewConfig, make_loader
from d3ssl.data.batch import IMAGENET_MEAN, IMAGENET_STD
from d3ssl.data.colour import ColourParams, apply_colour, normalize, sample_colour
from d3ssl.data.cpu_loader import EpochBatchSampler, _normalised, _stacked, normalise_uint8
from d3ssl.data.proposals import ProposalStore, write_store

S = 96
COLOURS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255], [0, 255, 255],
                    [255, 128, 0], [128, 0, 255]], np.uint8)


@pytest.fixture(scope="module")
def boxes_dataset(tmp_path_factory):
    """PNG images (black) where each proposal is a rectangle of its own colour, and their store."""
    root = tmp_path_factory.mktemp("boxes")
    rng = np.random.default_rng(0)
    keys, all_boxes, sizes, colour_of = [], [], [], {}
    for i in range(10):
        w, h = int(rng.integers(150, 260)), int(rng.integers(120, 220))
        img = np.zeros((h, w, 3), np.uint8)
        boxes = []
        # a 3x2 grid of cells with one rectangle each (no overlaps), random size inside the cell
        for c in range(6):
            cx, cy = (c % 3) * w // 3, (c // 3) * h // 2
            bw, bh = int(rng.integers(w // 6, w // 3 - 2)), int(rng.integers(h // 4, h // 2 - 2))
            x1 = cx + int(rng.integers(0, w // 3 - bw)); y1 = cy + int(rng.integers(0, h // 2 - bh))
            img[y1:y1 + bh, x1:x1 + bw] = COLOURS[(c + i) % len(COLOURS)]
            boxes.append([x1, y1, x1 + bw, y1 + bh])
        key = f"{i:02d}.png"
        cv2.imwrite(str(root / key), img[:, :, ::-1])
        keys.append(key)
        all_boxes.append(np.array(boxes, np.float32))
        sizes.append((w, h))
        colour_of[key] = [COLOURS[(c + i) % len(COLOURS)] for c in range(6)]
    store = str(tmp_path_factory.mktemp("store") / "p.bin")
    write_store(store, keys, all_boxes, np.array(sizes), np.zeros(len(keys)))
    return ImageFolder(str(root)), store, colour_of


def _pixels(view):
    """Normalised [3,H,W] -> uint8-scale float [H,W,3]."""
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return ((view * std + mean) * 255).permute(1, 2, 0).numpy()


def _box_colour(pixels, box, margin):
    x1, y1, x2, y2 = box
    region = pixels[int(np.ceil(y1)) + margin:int(np.floor(y2)) - margin,
                    int(np.ceil(x1)) + margin:int(np.floor(x2)) - margin]
    assert region.size, box
    return np.median(region.reshape(-1, 3), 0)


@pytest.mark.parametrize("workers", [0, 2])
def test_boxes_find_their_colours_through_the_loader(boxes_dataset, workers):
    ds, store, colour_of = boxes_dataset
    loader = make_loader(ds, store, batch_size=5, workers=workers, view_cfg=ViewConfig(size=S),
                         colour_cfg=ColourConfig(enabled=False), seed=1)
    checked = 0
    for epoch in range(2):
        loader.set_epoch(epoch)
        for batch in loader:
            for b in range(batch.size):
                key = ds.key(int(batch.image_id[b]))
                colours = np.array(colour_of[key], np.float32)
                p1, p2, p2s = _pixels(batch.view1[b]), _pixels(batch.view2[b]), _pixels(batch.view2_small[b])
                for k in range(batch.boxes1.shape[1]):
                    if not batch.box_valid[b, k]:
                        continue
                    c1 = _box_colour(p1, batch.boxes1[b, k].tolist(), 2)
                    c2 = _box_colour(p2, batch.boxes2[b, k].tolist(), 2)
                    c2s = _box_colour(p2s, (batch.boxes2[b, k] / 2).tolist(), 1)
                    # the colour is one of the image's proposals, the same one in all three views
                    j = np.abs(colours - c1).max(1).argmin()
                    assert np.abs(colours[j] - c1).max() < 12, (key, k, c1)
                    assert np.abs(colours[j] - c2).max() < 12, (key, k, c2)
                    assert np.abs(colours[j] - c2s).max() < 24, (key, k, c2s)
                    checked += 1
    assert checked > 60


def test_batch_contract_and_normalisation(boxes_dataset):
    ds, store, _ = boxes_dataset
    loader = make_loader(ds, store, batch_size=4, workers=0, view_cfg=ViewConfig(size=S),
                         colour_cfg=ColourConfig(enabled=False))
    assert len(loader) == 2
    batch = next(iter(loader))
    assert isinstance(batch, Batch)
    batch.validate()
    assert batch.view1.shape == (4, 3, S, S) and batch.view2_small.shape == (4, 3, S // 2, S // 2)
    for v in (batch.view1, batch.view2, batch.view2_small):
        assert v.dtype == torch.float32 and v.is_contiguous(memory_format=torch.channels_last)
    assert batch.boxes1.shape == (4, 4, 4) and batch.boxes1.dtype == torch.float32
    assert batch.box_valid.dtype == torch.bool and batch.image_id.dtype == torch.int64
    # black pixels normalise to -mean/std (float64 reference)
    black = -np.array(IMAGENET_MEAN) / np.array(IMAGENET_STD)
    corner = batch.view1[:, :, 0, 0].double().numpy()
    np.testing.assert_allclose(corner, np.tile(black, (4, 1)), atol=1e-5)
    ref = (np.arange(256)[:, None] / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    ramp = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, 1)
    np.testing.assert_allclose(normalize(ramp), ref, atol=1e-5)
    # the collate path: every value in every channel, against the float64 reference
    images = [np.roll(ramp, k, 0).reshape(16, 16, 3) for k in range(2)]
    got = _normalised(images)
    assert got.dtype == torch.float32 and got.shape == (2, 3, 16, 16)
    assert got.is_contiguous(memory_format=torch.channels_last)
    for k in range(2):
        np.testing.assert_allclose(got[k].permute(1, 2, 0).reshape(256, 3).numpy(), np.roll(ref, k, 0), atol=1e-5)


def test_seeded_and_worker_independent(boxes_dataset):
    ds, store, _ = boxes_dataset
    kw = dict(batch_size=4, view_cfg=ViewConfig(size=S), seed=3)
    a = next(iter(make_loader(ds, store, workers=0, **kw)))
    b = next(iter(make_loader(ds, store, workers=2, **kw)))
    for name in ("view1", "view2", "view2_small", "boxes1", "boxes2", "box_valid", "image_id"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    other = make_loader(ds, store, workers=0, **kw)
    other.set_epoch(1)
    c = next(iter(other))
    assert not torch.equal(a.image_id, c.image_id) or not torch.equal(a.view2, c.view2)
    d = next(iter(make_loader(ds, store, workers=0, **{**kw, "seed": 4})))
    assert not torch.equal(a.view1, d.view1)


def test_normalise_uint8_against_float64_and_the_workers():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (9, 7, 3), dtype=np.uint8) for _ in range(3)]
    pixels = _stacked(images)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 3, 9, 7)
    assert pixels.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(pixels.permute(0, 2, 3, 1), torch.from_numpy(np.stack(images)))
    got = normalise_uint8(pixels)
    assert got.dtype == torch.float32 and got.is_contiguous(memory_format=torch.channels_last)
    ref = (np.stack(images) / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(got.permute(0, 2, 3, 1).double().numpy(), ref, atol=1e-5)
    # the workers' normalisation, to within float32 rounding (one unit in the last place)
    torch.testing.assert_close(got, _normalised(images), rtol=0, atol=3e-7)
    # any layout in; bf16 out is the float32 result rounded once
    half = normalise_uint8(pixels.contiguous(), torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(half, got.to(torch.bfloat16))
    with pytest.raises(ValueError, match="uint8"):
        normalise_uint8(got)
    with pytest.raises(ValueError, match="uint8"):
        normalise_uint8(pixels[:, :2])


@pytest.mark.parametrize("workers", [0, 2])
def test_views_normalised_in_the_main_process_match_the_workers(boxes_dataset, workers):
    """normalise="device" (the default for GPU-bound batches): workers hand over uint8 pixels and the
    loader normalises where the batch is; on the CPU it can be asked for, and must give the batch
    the workers' normalisation gives."""
    ds, store, _ = boxes_dataset
    kw = dict(batch_size=4, workers=workers, view_cfg=ViewConfig(size=S), seed=5)
    ref = make_loader(ds, store, **kw)
    dev = make_loader(ds, store, normalise="device", **kw)
    assert ref.normalise == "worker" and dev.normalise == "device"
    # what the workers hand over: uint8 pixels, against float32 views
    raw, _ = next(iter(dev._loader))
    assert raw.view1.dtype == raw.view2_small.dtype == torch.uint8
    assert next(iter(ref._loader))[0].view1.dtype == torch.float32
    n = 0
    for a, b in zip(ref, dev):
        b.validate()
        for name in ("view1", "view2", "view2_small"):
            torch.testing.assert_close(getattr(b, name), getattr(a, name), rtol=0, atol=3e-7)
        for name in ("boxes1", "boxes2", "box_valid", "image_id"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        n += 1
    assert n == len(ref) == 2
    half = next(iter(make_loader(ds, store, normalise="device", dtype=torch.bfloat16, **kw)))
    first = next(iter(ref))
    assert half.view2.dtype == torch.bfloat16 and torch.equal(half.view2, first.view2.to(torch.bfloat16))
    with pytest.raises(ValueError, match="normalise"):
        make_loader(ds, store, normalise="gpu", **kw)
    with pytest.raises(ValueError, match="dtype applies"):
        make_loader(ds, store, dtype=torch.bfloat16, **kw)
    with pytest.raises(ValueError, match="dtype must be"):
        make_loader(ds, store, normalise="device", dtype=torch.int8, **kw)


@pytest.mark.cuda
def test_gpu_bound_batches_travel_as_uint8_and_arrive_normalised(boxes_dataset):
    ds, store, _ = boxes_dataset
    kw = dict(batch_size=4, workers=2, view_cfg=ViewConfig(size=S), seed=5)
    ref = next(iter(make_loader(ds, store, **kw)))
    loader = make_loader(ds, store, device="cuda", **kw)
    assert loader.normalise == "device"
    raw, _ = next(iter(loader._loader))   # the workers' batch, pinned: uint8 crosses to the GPU
    assert raw.view1.dtype == torch.uint8 and raw.view1.is_pinned()
    got = next(iter(loader))
    got.validate()
    for name in ("view1", "view2", "view2_small"):
        v = getattr(got, name)
        assert v.is_cuda and v.dtype == torch.float32
        torch.testing.assert_close(v.cpu(), getattr(ref, name), rtol=0, atol=3e-7)
    assert torch.equal(got.boxes2.cpu(), ref.boxes2) and torch.equal(got.image_id.cpu(), ref.image_id)
    # in the training step's dtype, as the trainer asks for it
    half = next(iter(make_loader(ds, store, device="cuda", dtype=torch.bfloat16, **kw)))
    assert half.view1.dtype == torch.bfloat16 and torch.equal(half.view1.cpu(), ref.view1.to(torch.bfloat16))


@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("world_size", [1, 3])
def test_sharding_no_duplicates_no_drops(drop_last, world_size):
    n, bs = 53, 4
    seen = []
    lengths = []
    for rank in range(world_size):
        s = EpochBatchSampler(n, bs, seed=7, rank=rank, world_size=world_size, drop_last=drop_last)
        s.set_epoch(2)
        batches = list(s)
        assert len(batches) == len(s)
        assert all(e == 2 for batch in batches for _, e in batch)
        lengths.append(len(batches))
        seen += [i for batch in batches for i, _ in batch]
        if drop_last:
            assert all(len(batch) == bs for batch in batches)
    assert len(seen) == len(set(seen))
    if drop_last:
        per_rank = n // world_size
        assert len(seen) == world_size * (per_rank // bs * bs) and len(set(lengths)) == 1
    else:
        assert sorted(seen) == list(range(n))


def test_corrupt_file_is_skipped_and_counted(boxes_dataset, tmp_path):
    ds, store, _ = boxes_dataset
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(len(ds)):
        (root / ds.key(i)).write_bytes(ds.read_bytes(i))
    (root / "03b_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    bad = ImageFolder(str(root))
    src = ProposalStore(store)
    keys = [bad.key(i) for i in range(len(bad))]
    boxes = [np.array(src.boxes(src.index_of(k))) if k in src.keys else np.zeros((1, 4), np.float32) for k in keys]
    sizes = [src.size(src.index_of(k)) if k in src.keys else (0, 0) for k in keys]
    write_store(str(tmp_path / "p.bin"), keys, boxes, np.array(sizes), np.array([k not in src.keys for k in keys]))
    loader = make_loader(bad, str(tmp_path / "p.bin"), batch_size=3, workers=0, drop_last=False, shuffle=False,
                         view_cfg=ViewConfig(size=S))
    broken = keys.index("03b_broken.png")
    with pytest.warns(RuntimeWarning, match="unreadable"):
        batches = list(loader)
    ids = torch.cat([b.image_id for b in batches]).tolist()
    assert len(ids) == len(bad) and loader.skipped == 1 and loader.skipped_keys == ["03b_broken.png"]
    assert broken not in ids and ids.count(broken + 1) == 2       # replaced by the next image
    # ... drawn with the broken file's slot's seed: another sample of that image, not a copy
    view1, boxes2 = torch.cat([b.view1 for b in batches]), torch.cat([b.boxes2 for b in batches])
    assert not torch.equal(view1[broken], view1[broken + 1]) and not torch.equal(boxes2[broken], boxes2[broken + 1])


@pytest.mark.parametrize("w, h", [(1000, 300), (2000, 320), (640, 200), (300, 1000)])
def test_resize_square_does_not_alias_long_sides(w, h):
    """1-px stripes across the long side of a wide or tall image average out (a bilinear shrink of
    that side by 3-9x, as an axis was halved only while both were large, kept them: std ~73)."""
    from d3ssl.data.cpu_loader import resize_square
    img = np.zeros((h, w, 3), np.uint8)
    if w > h:
        img[:, ::2] = 255
    else:
        img[::2] = 255
    out = resize_square(img, 224).astype(np.float64)
    assert out.shape == (224, 224, 3) and abs(out.mean() - 127.5) < 2 and out.std() < 3


@pytest.mark.parametrize("w", [640, 1023, 2047, 4095, 527, 401])
def test_resize_square_keeps_content_where_it_is(w):
    """An edge at original x lands at x * S / W in the view, also after halvings of odd widths
    (dropping their last column moved the content by up to ~0.8 view px); measured from the
    profile of a bright band (its mass is its width, its centroid its centre)."""
    from d3ssl.data.cpu_loader import resize_square
    s, h = 224, 500
    for x1, x2 in ((w // 2, w - 8), (8, w // 3), (3, w - 3)):
        img = np.zeros((h, w, 3), np.uint8)
        img[:, x1:x2] = 255
        p = resize_square(img, s)[s // 2, :, 0].astype(np.float64) / 255
        mass, centre = p.sum(), ((np.arange(s) + 0.5) * p).sum() / p.sum()
        assert abs(centre - mass / 2 - x1 * s / w) < 0.15 and abs(centre + mass / 2 - x2 * s / w) < 0.15, (x1, x2)


def test_make_loader_errors(boxes_dataset, tmp_path):
    ds, store, _ = boxes_dataset
    with pytest.raises(ValueError, match="backend"):
        make_loader(ds, store, backend="tpu")
    with pytest.raises(ValueError, match="rank"):
        make_loader(ds, store, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(ds, store, batch_size=0)
    with pytest.raises(ValueError, match="no full batch"):
        make_loader(ds, store, batch_size=6, world_size=2)
    write_store(str(tmp_path / "other.bin"), ["a.png"], [np.zeros((1, 4), np.float32)], np.ones((1, 2)), np.zeros(1))
    with pytest.raises(ValueError, match="regenerate"):
        make_loader(ds, str(tmp_path / "other.bin"), batch_size=2)
    with pytest.raises(FileNotFoundError, match="proposals store"):
        make_loader(ds, str(tmp_path / "missing.bin"), batch_size=2)


# ---- colour augmentation against torchvision's definitions ---------------------------------------

def _tv(img, fn, *args):
    t = torch.from_numpy(img).permute(2, 0, 1).contiguous()
    return fn(t, *args).permute(1, 2, 0).numpy().astype(np.float64)


@pytest.fixture
def photo():
    rng = np.random.default_rng(0)
    img = cv2.resize(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), (64, 64), interpolation=cv2.INTER_CUBIC)
    return img


@pytest.mark.parametrize("op,field,value,tv_fn,tol", [
    (0, "brightness", 1.3, TF.adjust_brightness, 0.6),
    (1, "contrast", 0.7, TF.adjust_contrast, 0.6),
    (2, "saturation", 1.2, TF.adjust_saturation, 0.6),
    (3, "hue", 0.08, TF.adjust_hue, 3.0),
])
def test_jitter_matches_torchvision(photo, op, field, value, tv_fn, tol):
    p = ColourParams(order=(op,), jitter=True, **{field: value})
    ours = apply_colour(photo.copy(), p).astype(np.float64)
    ref = _tv(photo, tv_fn, value)
    assert np.abs(ours - ref).mean() < tol, np.abs(ours - ref).mean()
    assert np.abs(ours - photo).mean() > 2          # it did something


def test_grayscale_solarize_blur(photo):
    g = apply_colour(photo.copy(), ColourParams(grayscale=True)).astype(np.float64)
    assert np.abs(g - _tv(photo, TF.rgb_to_grayscale, 3)).max() <= 1
    s = apply_colour(photo.copy(), ColourParams(solarize=True)).astype(np.float64)
    assert np.array_equal(s, _tv(photo, TF.solarize, 128))
    b = apply_colour(photo.copy(), ColourParams(blur_sigma=1.5)).astype(np.float64)
    ref = _tv(photo, TF.gaussian_blur, [9, 9], [1.5, 1.5])
    assert np.abs(b - ref)[8:-8, 8:-8].mean() < 1.0


def test_colour_draw_probabilities():
    cfg = ColourConfig()
    rng = np.random.default_rng(0)
    n = 4000
    v1 = [sample_colour(rng, cfg, 0, 224) for _ in range(n)]
    v2 = [sample_colour(rng, cfg, 1, 224) for _ in range(n)]
    assert abs(np.mean([p.jitter for p in v1]) - 0.8) < 0.03
    assert abs(np.mean([p.grayscale for p in v2]) - 0.2) < 0.03
    assert all(p.blur_sigma > 0 for p in v1) and abs(np.mean([p.blur_sigma > 0 for p in v2]) - 0.1) < 0.02
    assert not any(p.solarize for p in v1) and abs(np.mean([p.solarize for p in v2]) - 0.2) < 0.03
    j = [p for p in v1 if p.jitter]
    assert min(p.brightness for p in j) >= 0.6 and max(p.brightness for p in j) <= 1.4
    assert min(p.hue for p in j) >= -0.1 and max(p.hue for p in j) <= 0.1
    assert min(p.blur_sigma for p in v1) >= 0.1 and max(p.blur_sigma for p in v1) <= 2.0
    assert max(p.blur_sigma for p in v1) > 1.9
    assert all(sample_colour(rng, ColourConfig(enabled=False), 1, 224) == ColourParams() for _ in range(10))


def test_blur_sigma_scales_with_the_view_size():
    """The recipe's sigmas are for 224-pixel views: a 64-pixel view gets 64/224 of them, and
    nothing else of the draw changes."""
    cfg = ColourConfig()
    for view in (0, 1):
        for seed in range(50):
            big = sample_colour(np.random.default_rng(seed), cfg, view, 224)
            small = sample_colour(np.random.default_rng(seed), cfg, view, 64)
            assert small.blur_sigma == pytest.approx(big.blur_sigma * 64 / 224)
            assert (small.brightness, small.hue, small.grayscale, small.solarize) == \
                   (big.brightness, big.hue, big.grayscale, big.solarize)
    own = ColourConfig(blur_reference_size=64)
    assert sample_colour(np.random.default_rng(3), own, 0, 64).blur_sigma == \
           sample_colour(np.random.default_rng(3), cfg, 0, 224).blur_sigma
    with pytest.raises(ValueError, match="blur_reference_size"):
        ColourConfig(blur_reference_size=0)
    with pytest.raises(ValueError, match="blur_sigma"):
        ColourConfig(blur_sigma=(2.0, 0.1))
    with pytest.raises(ValueError, match="hue"):
        ColourConfig(hue=0.6)


def _deferring_worker(wait):
    import time

    from d3ssl.data.stopping import defer_stop_signals
    defer_stop_signals(wait)
    time.sleep(60)


def _parent_of_a_deferring_worker(wait, pids):
    """A training process stand-in: starts a deferring worker, tells its pid, then waits to be killed."""
    import multiprocessing
    import time
    worker = multiprocessing.get_context("fork").Process(target=_deferring_worker, args=(wait,))
    worker.start()
    pids.put(worker.pid)
    time.sleep(60)


def _ends_at_the_next_signal(worker):
    import signal
    import time
    t0 = time.monotonic()
    worker.terminate()
    worker.join(timeout=5)
    assert worker.exitcode == -signal.SIGTERM and time.monotonic() - t0 < 1


def _alive(pid):
    """Whether process `pid` runs (a zombie, which no one may reap here, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc") or not hasattr(__import__("signal"), "SIGALRM"),
                    reason="POSIX signals, /proc")
def test_a_signalled_worker_waits_for_a_stopping_training_process(monkeypatch):
    """defer_stop_signals: a worker signalled with its training process (the whole process group)
    goes on while that process finishes its step, however long that takes, and ends on the next
    signal; signalled alone (its loader ending it), it ends `wait` seconds later, also when a flag
    of another process with this pid (one left behind by a killed run) is up; it ends when its
    parent is gone."""
    import multiprocessing
    import signal
    import time

    from d3ssl.data import stopping
    monkeypatch.delenv(stopping.STOP_FLAG_ENV, raising=False)
    fork = multiprocessing.get_context("fork")
    stale = stopping.new_stop_flag()
    stopping.announce_stop()                   # a flag left up by an earlier run of this pid
    flag = stopping.new_stop_flag()            # this run's, not up
    assert stale != flag and os.path.exists(stale) and not os.path.exists(flag)
    # alone: the parent says nothing
    worker = fork.Process(target=_deferring_worker, args=(1.5,))
    worker.start()
    try:
        time.sleep(0.5)
        t0 = time.monotonic()
        worker.terminate()                       # SIGTERM
        time.sleep(0.6)
        assert worker.is_alive()
        worker.join(timeout=10)
        assert worker.exitcode == -signal.SIGTERM and 1.2 < time.monotonic() - t0 < 4
    finally:
        os.remove(stale)
        if worker.is_alive():
            worker.kill()
    # alone, and signalled again (its loader's shutdown, then multiprocessing's at exit): it ends at once
    worker = fork.Process(target=_deferring_worker, args=(30.0,))
    worker.start()
    try:
        time.sleep(0.5)
        worker.terminate()
        time.sleep(0.3)
        assert worker.is_alive()
        _ends_at_the_next_signal(worker)
    finally:
        if worker.is_alive():
            worker.kill()
    # with the parent stopping too: it outlives the wait, and the next signal ends it at once
    worker = fork.Process(target=_deferring_worker, args=(1.0,))
    worker.start()
    try:
        time.sleep(0.5)
        worker.terminate()
        stopping.announce_stop()
        assert os.path.exists(flag)
        time.sleep(2.5)
        assert worker.is_alive()
        _ends_at_the_next_signal(worker)
    finally:
        stopping.clear_stop()
        if worker.is_alive():
            worker.kill()
    assert not os.path.exists(flag)
    # the parent gone: its worker ends (its new parent does not speak for it)
    pids = fork.Queue()
    parent = fork.Process(target=_parent_of_a_deferring_worker, args=(100.0, pids))
    parent.start()
    pid = pids.get(timeout=10)
    try:
        time.sleep(0.5)
        os.kill(pid, signal.SIGINT)
        time.sleep(1.0)
        assert _alive(pid)
        parent.kill()
        parent.join()
        deadline = time.monotonic() + 5
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(pid)
    finally:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _long_cpp_call(seconds):
    """A callable that spends about `seconds` in one PyTorch operator (C++, the GIL released)."""
    import time
    a = torch.randn(1536, 1536)
    torch.mm(a, a)
    t0 = time.perf_counter()
    torch.mm(a, a)
    n = int(1536 * (seconds / (time.perf_counter() - t0)) ** (1 / 3))
    b = torch.randn(n, n)
    return lambda: torch.mm(b, b)


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGALRM"), reason="POSIX signals")
def test_the_watcher_raises_the_stop_flag_during_a_long_cpp_call(monkeypatch):
    """Python runs a signal's handler only once the main thread is back in Python: a training
    process inside one long C++ call (a CPU backward) would raise its workers' flag too late. The
    SignalWatcher raises it at once."""
    import signal
    import threading
    import time

    from d3ssl.data import stopping
    monkeypatch.delenv(stopping.STOP_FLAG_ENV, raising=False)
    flag = stopping.new_stop_flag()
    seen = {}
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.setdefault("handler", time.monotonic()))
    watcher = stopping.SignalWatcher()
    call = _long_cpp_call(2.0)

    def signal_then_look():
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 10
        while not os.path.exists(flag) and time.monotonic() < deadline:
            time.sleep(0.01)
        seen["flag"] = time.monotonic()

    looker = threading.Thread(target=signal_then_look)
    try:
        looker.start()
        t0 = time.monotonic()
        call()
        returned = time.monotonic()
        looker.join()
    finally:
        watcher.close()
        signal.signal(signal.SIGTERM, previous)
        raised = os.path.exists(flag)
        stopping.clear_stop()
    if returned - t0 < 0.8:
        pytest.skip(f"the operator took {returned - t0:.2f} s: too short to tell")
    assert raised and seen["flag"] < returned - 0.2 and seen["handler"] > seen["flag"]
    assert not watcher._thread.is_alive() and signal.set_wakeup_fd(-1) == -1   # closed, and undone


def _report_signal_state(queue):
    import signal
    queue.put((signal.set_wakeup_fd(-1), signal.getsignal(signal.SIGTERM) == signal.SIG_DFL))


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGALRM"), reason="POSIX signals")
def test_a_process_forked_while_the_watcher_is_on_has_neither_its_pipe_nor_its_handlers(monkeypatch):
    """A DALI source worker is forked during training: with the watcher's pipe and the trainer's
    stop handler it would raise the trainer's flag on a signal meant for itself."""
    import multiprocessing
    import signal

    from d3ssl.data import stopping
    monkeypatch.delenv(stopping.STOP_FLAG_ENV, raising=False)
    flag = stopping.new_stop_flag()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stopping.announce_stop())
    watcher = stopping.SignalWatcher()
    try:
        fork = multiprocessing.get_context("fork")
        queue = fork.Queue()
        child = fork.Process(target=_report_signal_state, args=(queue,))
        child.start()
        assert queue.get(timeout=20) == (-1, True)     # no wakeup fd, SIGTERM's default action
        child.join(timeout=20)
        child = fork.Process(target=__import__("time").sleep, args=(30,))
        child.start()
        __import__("time").sleep(0.5)                  # (settled: forked, at-fork handlers run)
        child.terminate()                              # a signal for the child alone
        child.join(timeout=20)
        assert child.exitcode == -signal.SIGTERM and not os.path.exists(flag)
    finally:
        watcher.close()
        signal.signal(signal.SIGTERM, previous)
        stopping.clear_stop()


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGALRM"), reason="POSIX signals")
def test_the_watcher_counts_a_second_ctrl_c():
    import signal
    import time

    from d3ssl.data import stopping
    previous = signal.signal(signal.SIGINT, lambda signum, frame: None)
    watcher = stopping.SignalWatcher()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)
        assert not stopping.interrupted_twice()
        os.kill(os.getpid(), signal.SIGINT)
        deadline = time.monotonic() + 5
        while not stopping.interrupted_twice() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stopping.interrupted_twice()
    finally:
        watcher.close()
        signal.signal(signal.SIGINT, previous)
        stopping.reset_interrupts()
    assert not stopping.interrupted_twice()


def test_unreadable_images_are_warned_about_for_a_few_batches_then_counted():
    """A dataset with many unreadable files: a warning for each of the first WARNED_SKIPS batches
    with one (the last says that counting goes on silently), every key counted."""
    import warnings
    from types import SimpleNamespace

    from d3ssl.data.cpu_loader import WARNED_SKIPS, warn_skipped
    loader = SimpleNamespace(skipped_keys=[])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for b in range(12):
            warn_skipped(loader, [f"{b}a.jpg", f"{b}b.jpg"])
    texts = [str(w.message) for w in caught]
    assert len(texts) == WARNED_SKIPS == 5 and len(loader.skipped_keys) == 24
    assert texts[0].startswith("skipped 2 unreadable image(s): ['0a.jpg', '0b.jpg'] (2 so far this run)")
    assert "further ones are counted" in texts[-1] and "(10 so far" in texts[-1]
    assert not any("further" in t for t in texts[:-1])

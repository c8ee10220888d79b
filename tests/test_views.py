import numpy as np
import pytest

from d3ssl.data.views import ViewConfig, random_resized_crop, sample_seed, sample_views


def _random_case(rng):
    w, h = int(rng.integers(40, 400)), int(rng.integers(40, 400))
    n = int(rng.integers(0, 12))
    xy = rng.uniform(0, 1, (n, 2)) * [w, h]
    wh = rng.uniform(0.05, 0.9, (n, 2)) * [w, h]
    props = np.concatenate([xy, np.minimum(xy + wh, [w, h])], 1)
    return w, h, props


def _unflip(b, flip, s):
    return np.stack([s - b[:, 2], b[:, 1], s - b[:, 0], b[:, 3]], 1) if flip else b


def test_invariants_against_float64_reference():
    """Boxes inside the views; row k of both views is the same proposal (checked by mapping both
    back to image pixels in float64); valid rows are distinct proposals, padding repeats them."""
    cfg = ViewConfig(size=96)
    s = cfg.size
    rng = np.random.default_rng(0)
    fallbacks = 0
    for t in range(400):
        w, h, props = _random_case(rng)
        p = sample_views(w, h, props, np.random.default_rng(t), cfg)
        x0, y0, cw, ch = p.crop
        assert all(float(v).is_integer() for v in p.crop)
        assert 0 <= x0 and 0 <= y0 and cw >= 1 and ch >= 1 and x0 + cw <= w and y0 + ch <= h
        for b in (p.boxes1, p.boxes2):
            assert b.shape == (cfg.num_boxes, 4) and b.dtype == np.float32
            assert (b >= 0).all() and (b <= s).all()
            assert (b[:, 2] >= b[:, 0]).all() and (b[:, 3] >= b[:, 1]).all()
        assert p.valid.dtype == bool and p.valid[0]
        nv = int(p.valid.sum())
        assert (p.valid == (np.arange(cfg.num_boxes) < nv)).all()
        b1 = _unflip(p.boxes1.astype(np.float64), p.flip1, s) * [w / s, h / s, w / s, h / s]
        b2 = _unflip(p.boxes2.astype(np.float64), p.flip2, s) * [cw / s, ch / s, cw / s, ch / s] + [x0, y0, x0, y0]
        clipped = np.stack([np.clip(b1[:, 0], x0, x0 + cw), np.clip(b1[:, 1], y0, y0 + ch),
                            np.clip(b1[:, 2], x0, x0 + cw), np.clip(b1[:, 3], y0, y0 + ch)], 1)
        np.testing.assert_allclose(b2, clipped, atol=1e-3)      # same proposal, clipped to the crop
        crop_box = np.array([x0, y0, x0 + cw, y0 + ch])
        if len(props) and not np.allclose(b1[0], crop_box, atol=1e-3) or nv > 1:
            # valid rows are distinct input proposals
            d = np.abs(b1[:nv, None] - props[None]).max(-1)
            assert (d.min(1) < 1e-3).all()
            assert len({tuple(np.round(r, 3)) for r in b1[:nv]}) == nv or len(props) > len(np.unique(props, axis=0))
            for k in range(nv):        # each survivor overlaps the crop enough and is big enough
                pb = props[d[k].argmin()]
                inter = (clipped[k, 2] - clipped[k, 0]) * (clipped[k, 3] - clipped[k, 1])
                assert inter >= cfg.min_overlap * (pb[2] - pb[0]) * (pb[3] - pb[1]) - 1e-6
                assert (p.boxes2[k, 2] - p.boxes2[k, 0]) >= cfg.min_box_size - 1e-3
        else:
            fallbacks += 1
            assert nv == 1
            np.testing.assert_allclose(p.boxes2[0], _unflip(np.array([[0, 0, s, s]], float), p.flip2, s)[0])
        # padding rows repeat the valid ones in order
        for k in range(nv, cfg.num_boxes):
            np.testing.assert_array_equal(p.boxes1[k], p.boxes1[k % nv])
            np.testing.assert_array_equal(p.boxes2[k], p.boxes2[k % nv])
    assert 0 < fallbacks < 200


def test_no_proposals_falls_back_to_the_crop_window():
    cfg = ViewConfig(size=64, flip_p=0.0)
    p = sample_views(200, 100, np.zeros((0, 4)), np.random.default_rng(1), cfg)
    x0, y0, w, h = p.crop
    assert p.valid.tolist() == [True, False, False, False]
    np.testing.assert_allclose(p.boxes2, np.tile([0, 0, 64, 64], (4, 1)))
    np.testing.assert_allclose(p.boxes1[0], [x0 * 64 / 200, y0 * 64 / 100, (x0 + w) * 64 / 200, (y0 + h) * 64 / 100],
                               rtol=1e-6)


def test_padding_with_two_proposals_and_retry():
    cfg = ViewConfig(size=100, flip_p=0.0, crop_scale=(0.99, 1.0), crop_ratio=(1.0, 1.0))
    props = np.array([[0, 0, 50, 50], [50, 50, 100, 100]], np.float32)
    p = sample_views(100, 100, props, np.random.default_rng(0), cfg)
    assert p.valid.tolist() == [True, True, False, False]
    assert {tuple(r) for r in p.boxes1[:2].tolist()} == {(0, 0, 50, 50), (50, 50, 100, 100)}
    np.testing.assert_array_equal(p.boxes1[2:], p.boxes1[:2])
    # a proposal in one corner, small crops: retrying the crop finds one that holds it
    corner = np.array([[0, 0, 30, 30]])

    def survives(retries, i):
        p = sample_views(100, 100, corner, np.random.default_rng(i),
                         ViewConfig(size=100, crop_scale=(0.4, 0.4), crop_retries=retries, num_boxes=1))
        x0, y0, w, h = p.crop
        inside = max(0, min(30, x0 + w) - x0) * max(0, min(30, y0 + h) - y0)
        return inside >= 0.5 * 900

    assert sum(survives(50, i) for i in range(20)) >= 18
    assert sum(survives(1, i) for i in range(20)) <= 10


def test_flips_mirror_boxes():
    props = np.array([[10, 20, 60, 90], [70, 10, 140, 60], [5, 5, 150, 110]], np.float32)
    for seed in range(10):
        a = sample_views(160, 120, props, np.random.default_rng(seed), ViewConfig(size=64, flip_p=0.0))
        b = sample_views(160, 120, props, np.random.default_rng(seed), ViewConfig(size=64, flip_p=1.0))
        assert a.crop == b.crop and not a.flip1 and b.flip1 and b.flip2
        np.testing.assert_allclose(b.boxes1, _unflip(a.boxes1, True, 64), atol=1e-5)
        np.testing.assert_allclose(b.boxes2, _unflip(a.boxes2, True, 64), atol=1e-5)


def test_crop_distribution():
    rng = np.random.default_rng(0)
    for _ in range(300):
        x0, y0, w, h = random_resized_crop(300, 200, rng, (0.4, 1.0), (3 / 4, 4 / 3))
        assert 0.4 * 0.95 <= w * h / 60000 <= 1.0 and 0.7 <= w / h <= 1.4
        assert x0 + w <= 300 and y0 + h <= 200
    assert random_resized_crop(1000, 10, rng, (0.4, 1.0), (3 / 4, 4 / 3))[2:] == (13, 10)   # fallback


def test_sample_seed():
    assert sample_seed(0, 1, 2) == sample_seed(0, 1, 2)
    seeds = {sample_seed(b, e, i) for b in range(3) for e in range(3) for i in range(50)}
    assert len(seeds) == 450
    p = [sample_views(100, 80, np.array([[0, 0, 50, 50]]), np.random.default_rng(sample_seed(0, 0, 7)), ViewConfig())
         for _ in range(2)]
    assert p[0].crop == p[1].crop and np.array_equal(p[0].boxes2, p[1].boxes2)


def test_config_errors():
    with pytest.raises(ValueError, match="size"):
        ViewConfig(size=225)
    with pytest.raises(ValueError, match="crop_scale"):
        ViewConfig(crop_scale=(0.5, 1.5))
    with pytest.raises(ValueError, match="num_boxes"):
        ViewConfig(num_boxes=0)
    with pytest.raises(ValueError, match="image size"):
        sample_views(0, 10, np.zeros((0, 4)), np.random.default_rng(0), ViewConfig())

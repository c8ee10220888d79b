"""Coupling rate, positional bias (MCS) and disturbed O-KNN on inputs whose answer is known."""
import json
import os

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from d3ssl.eval import coupling, disturbed, positional, probe

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


# --- stand-in networks with torchvision's ResNet attribute layout -------------------------------------

class _Layout(nn.Module):
    def __init__(self, conv1, layers, maxpool=None):
        super().__init__()
        self.conv1, self.bn1, self.relu = conv1, nn.Identity(), nn.Identity()
        self.maxpool = maxpool or nn.Identity()
        self.layer1, self.layer2, self.layer3, self.layer4 = layers


def pointwise_net(channels=6):
    """1×1 convolutions only (stride 2 where ResNet downsamples): a feature reads exactly one pixel."""
    def block(cin, stride):
        return nn.Sequential(nn.Conv2d(cin, channels, 1, stride=stride), nn.ReLU())
    net = _Layout(nn.Conv2d(3, channels, 1, stride=2),
                  [block(channels, 1), block(channels, 2), block(channels, 2), block(channels, 2)],
                  maxpool=nn.MaxPool2d(1, stride=2))
    net.relu = nn.ReLU()
    return net.eval()


class GlobalMean(nn.Module):
    """Every position gets the image's per-channel mean, plus a shift that keeps cosines away from 0."""

    def forward(self, x):
        return (x.mean((2, 3), keepdim=True) + 3.0).expand_as(x)


class XCoordinate(nn.Module):
    """Two channels: 1 and the pixel column's centre in [0,1]: a feature that is pure position."""

    def forward(self, x):
        n, _, h, w = x.shape
        col = (torch.arange(w, dtype=x.dtype) + 0.5) / w
        return torch.stack([torch.ones(n, h, w, dtype=x.dtype), col.expand(n, h, w)], 1)


def _objects(rng, n, size=(40, 70)):
    return [rng.integers(0, 256, (int(rng.integers(*size)), int(rng.integers(*size)), 3), dtype=np.uint8)
            for _ in range(n)]


def _normalize_ref(img):
    return ((img.astype(np.float64) / 255.0 - MEAN) / STD)  # [H,W,3]


# --- box pooling ---------------------------------------------------------------------------------------

def test_box_average_pool_matches_pixel_reference():
    rng = np.random.default_rng(0)
    h, w, stride = 6, 8, 4
    fmap = torch.randn(2, 5, h, w, dtype=torch.float64)
    boxes = []
    for _ in range(2):
        row = []
        for _ in range(3):
            x1, y1 = rng.integers(0, w * stride - 2), rng.integers(0, h * stride - 2)
            row.append([x1, y1, rng.integers(x1 + 1, w * stride + 1), rng.integers(y1 + 1, h * stride + 1)])
        boxes.append(row)
    boxes = np.array(boxes, np.float64)
    got = probe.box_average_pool(fmap, torch.as_tensor(boxes), (h * stride, w * stride)).numpy()
    # Reference: the map upsampled to pixels (each cell covers stride×stride pixels), averaged over the box.
    up = fmap.numpy().repeat(stride, 2).repeat(stride, 3)
    for n in range(2):
        for m in range(3):
            x1, y1, x2, y2 = boxes[n, m].astype(int)
            np.testing.assert_allclose(got[n, m], up[n, :, y1:y2, x1:x2].mean((1, 2)), rtol=1e-12)


def test_box_average_pool_rejects_boxes_outside():
    with pytest.raises(ValueError, match="boxes"):
        probe.box_average_pool(torch.ones(1, 2, 4, 4), torch.tensor([[[20.0, 20, 30, 30]]]), (16, 16))


def test_layer_features_rejects_other_layouts():
    with pytest.raises(TypeError, match="torchvision's layout"):
        probe.layer_features(nn.Conv2d(3, 3, 1), torch.zeros(1, 3, 8, 8))


def test_layer_features_of_torchvision_resnet():
    net = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    feats = probe.layer_features(net, x)
    assert [tuple(f.shape[1:]) for f in feats.values()] == [(64, 32, 32), (64, 16, 16), (128, 8, 8),
                                                            (256, 4, 4), (512, 2, 2)]
    with torch.no_grad():
        ref = net.layer4(net.layer3(net.layer2(net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(x))))))))
    torch.testing.assert_close(feats["layer4"], ref)


# --- coupling rate ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("gap", [0, 5])
def test_coupling_rate_is_one_for_pointwise_network(gap):
    rng = np.random.default_rng(1)
    crops = _objects(rng, 6)
    i1, i2, ba, bb = zip(*[coupling.compose_pair(crops[k], crops[k + 3], 224, 96, gap) for k in range(3)])
    cr = coupling.coupling_rate_images(pointwise_net(), probe.normalize_images(np.stack(i1)),
                                       probe.normalize_images(np.stack(i2)), torch.as_tensor(np.stack(ba)),
                                       torch.as_tensor(np.stack(bb)))
    assert list(cr) == list(probe.LAYERS)
    for name, value in cr.items():
        np.testing.assert_allclose(value.numpy(), 1.0, atol=1e-6, err_msg=name)


def test_probes_of_a_network_in_train_mode_do_not_depend_on_the_batch():
    """In train mode BatchNorm would normalise with the batch's statistics (and move its running
    ones): a pair's CR and an object's MCS would change with the other images of their batch. The
    probes run the backbone in eval mode and give it back in the mode it had."""
    net = torchvision.models.resnet18(num_classes=1).train()
    rng = np.random.default_rng(3)
    crops = _objects(rng, 6)
    pairs = [coupling.compose_pair(crops[k], crops[k + 3], 64, 24, 0) for k in range(3)]
    i1, i2, ba, bb = (torch.as_tensor(np.stack(v)) for v in zip(*pairs))
    i1, i2 = probe.normalize_images(i1.numpy()), probe.normalize_images(i2.numpy())
    before = {k: v.clone() for k, v in net.state_dict().items()}
    alone = coupling.coupling_rate_images(net, i1[:1], i2[:1], ba[:1], bb[:1])
    batch = coupling.coupling_rate_images(net, i1, i2, ba, bb)
    grids = [positional.tile_grid(c, 32) for c in crops[:3]]
    images, boxes = probe.normalize_images(np.stack([g[0] for g in grids])), torch.as_tensor(np.stack([g[1] for g in grids]))
    mcs_alone = positional.grid_similarity(net, images[:1], boxes[:1])
    mcs_batch = positional.grid_similarity(net, images, boxes)
    assert net.training
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k              # running statistics untouched
    for name in probe.LAYERS:
        torch.testing.assert_close(alone[name], batch[name][:1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mcs_alone[name], mcs_batch[name][:1], rtol=1e-5, atol=1e-6)


def test_probe_images_must_be_whole_numbers_of_the_backbone_stride():
    """Each feature cell must cover whole pixels for the exact box pooling: image sides that are
    not multiples of 32 are refused, by the functions and by the report's command line."""
    objects = [probe.GroundTruthObject("unused.png", (0.0, 0.0, 10.0, 10.0), c) for c in (1, 2)]
    with pytest.raises(ValueError, match="image_size must be a positive multiple of 32"):
        coupling.coupling_rate(pointwise_net(), objects, num_pairs=1, image_size=100, object_size=40)
    with pytest.raises(ValueError, match="tile_size must be a positive multiple of 32"):
        positional.mean_cosine_similarity(pointwise_net(), objects, num_objects=1, tile_size=50)


def test_coupling_rate_of_global_network_matches_formula():
    rng = np.random.default_rng(2)
    a, b = _objects(rng, 2)
    im1, im2, box_a, box_b = coupling.compose_pair(a, b, 128, 48, 4)
    net = _Layout(GlobalMean(), [nn.Identity()] * 4)
    cr = coupling.coupling_rate_images(net, probe.normalize_images(im1[None]), probe.normalize_images(im2[None]),
                                       torch.as_tensor(box_a[None]), torch.as_tensor(box_b[None]))
    # f(A1) = f(B) = mean(image 1) + 3, f(A2) = mean(image 2) + 3  =>  CR = 1 / cos(m2, m1).
    m1 = _normalize_ref(im1).mean((0, 1)) + 3.0
    m2 = _normalize_ref(im2).mean((0, 1)) + 3.0
    expected = 1.0 / (m1 @ m2 / np.linalg.norm(m1) / np.linalg.norm(m2))
    assert expected > 1.0 + 1e-4  # the test can fail: B changes A's feature
    for name, value in cr.items():
        np.testing.assert_allclose(value.numpy(), [expected], rtol=1e-5, err_msg=name)


def test_compose_pair_places_objects():
    rng = np.random.default_rng(3)
    a, b = _objects(rng, 2)
    im1, im2, box_a, box_b = coupling.compose_pair(a, b, 224, 96, 6)
    x1, y1, x2, y2 = box_a.astype(int)
    np.testing.assert_array_equal(im1[y1:y2, x1:x2], im2[y1:y2, x1:x2])
    assert max(y2 - y1, x2 - x1) == 96 and x2 <= 112 and box_b[0] == x2 + 6
    mask = np.zeros(im1.shape[:2], bool)
    mask[y1:y2, x1:x2] = True
    assert not im2[~mask].any()  # image 2: A on black
    bx1, by1, bx2, by2 = box_b.astype(int)
    mask[by1:by2, bx1:bx2] = True
    assert not im1[~mask].any()  # image 1: A and B on black
    with pytest.raises(ValueError, match="object_size"):
        coupling.compose_pair(a, b, 100, 60, 0)
    with pytest.raises(ValueError, match="gap must be >= 0 px"):   # B would be pasted over A
        coupling.compose_pair(a, b, 224, 96, -20)


def test_sample_pairs_have_different_categories():
    objs = [probe.GroundTruthObject("x", (0, 0, 1, 1), c) for c in [1, 1, 2, 3, 3]]
    pairs = coupling.sample_pairs(objs, 50, seed=0)
    assert len(pairs) == 50 and all(objs[a].category != objs[b].category for a, b in pairs)
    assert pairs == coupling.sample_pairs(objs, 50, seed=0)
    with pytest.raises(ValueError, match="two categories"):
        coupling.sample_pairs(objs[:2], 3)


# --- positional bias -------------------------------------------------------------------------------------

def test_mcs_is_one_for_pointwise_network():
    rng = np.random.default_rng(4)
    grids = [positional.tile_grid(c, 64) for c in _objects(rng, 3)]
    mcs = positional.grid_similarity(pointwise_net(), probe.normalize_images(np.stack([g[0] for g in grids])),
                                     torch.as_tensor(np.stack([g[1] for g in grids])))
    for name, value in mcs.items():
        np.testing.assert_allclose(value.numpy(), 1.0, atol=1e-6, err_msg=name)


def test_mcs_of_positional_network_matches_formula():
    rng = np.random.default_rng(5)
    image, boxes = positional.tile_grid(_objects(rng, 1)[0], 32)
    net = _Layout(XCoordinate(), [nn.Identity()] * 4)
    mcs = positional.grid_similarity(net, probe.normalize_images(image[None]), torch.as_tensor(boxes[None]))
    # Tile in column c has feature (1, (c + 0.5) / 3); the centre is column 1.
    feats = np.array([[1.0, (c + 0.5) / 3] for r in range(3) for c in range(3)])
    cos = feats @ feats[4] / np.linalg.norm(feats, axis=1) / np.linalg.norm(feats[4])
    expected = np.delete(cos, 4).mean()
    assert expected < 0.99
    for name, value in mcs.items():
        np.testing.assert_allclose(value.numpy(), [expected], rtol=1e-6, err_msg=name)


def test_tile_grid_repeats_the_tile():
    image, boxes = positional.tile_grid(np.arange(30 * 20 * 3, dtype=np.uint8).reshape(30, 20, 3), 16)
    assert image.shape == (48, 48, 3) and boxes.shape == (9, 4)
    centre = image[16:32, 16:32]
    for x1, y1, x2, y2 in boxes.astype(int):
        np.testing.assert_array_equal(image[y1:y2, x1:x2], centre)



def test_tile_grid_shrinks_without_aliasing():
    """A crop of 1-px stripes (one bright column in four) shrunk 4x into a tile averages them (63.75);
    a bilinear resize would sample only dark columns. A crop smaller than the tile is enlarged."""
    crop = np.zeros((384, 384, 3), np.uint8)
    crop[:, ::4] = 255
    image, _ = positional.tile_grid(crop, 96)
    np.testing.assert_allclose(image, 63.75, atol=0.5)
    for elongated in (crop[:60], crop.transpose(1, 0, 2)[:, :60]):   # shrinks along one axis, grows along the other
        stripes = 0 if elongated.shape[0] == 60 else 1
        image, _ = positional.tile_grid(np.ascontiguousarray(elongated), 96)
        np.testing.assert_allclose(image, 63.75, atol=0.5, err_msg=f"stripes along axis {stripes}")
    small, _ = positional.tile_grid(crop[:48, :48], 96)
    assert small.shape == (288, 288, 3) and small.max() > 200

# --- on a tiny synthetic dataset ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    from d3ssl.data.synthetic import ensure_synthetic
    return ensure_synthetic(str(tmp_path_factory.mktemp("syn")), seed=0, num_train=8, num_val=6, workers=1)


def test_random_network_mcs_close_to_one(synthetic_root):
    objects = probe.load_objects(synthetic_root, "val", min_size=24)
    mcs = positional.mean_cosine_similarity(torchvision.models.resnet18(), objects, num_objects=4, progress=False)
    for name, values in mcs.items():
        assert values.shape == (4,)
        assert probe.summarize(values)["mean"] > 0.9, name


def test_coupling_rate_on_dataset(synthetic_root):
    objects = probe.load_objects(synthetic_root, "val", min_size=24)
    net = pointwise_net().train()
    cr = coupling.coupling_rate(net, objects, num_pairs=5, batch_size=2, progress=False)
    for name, values in cr.items():
        assert values.shape == (5,)
        np.testing.assert_allclose(values, 1.0, atol=1e-6)
    assert net.training  # mode restored
    cr = coupling.coupling_rate(torchvision.models.resnet18(), objects, num_pairs=3, progress=False)
    assert all(np.isfinite(v).all() for v in cr.values())


def test_load_objects_errors(tmp_path, synthetic_root):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        probe.load_objects(str(tmp_path / "nowhere"))
    os.makedirs(tmp_path / "val")
    with pytest.raises(FileNotFoundError, match="instances_val.json"):
        probe.load_objects(str(tmp_path))
    os.makedirs(tmp_path / "annotations")
    with open(tmp_path / "annotations" / "instances_val.json", "w") as f:
        json.dump({"images": [], "annotations": []}, f)
    with pytest.raises(ValueError, match="no non-crowd object"):
        probe.load_objects(str(tmp_path))
    objects = probe.load_objects(synthetic_root, "val", min_size=24)
    assert all(o.box[2] - o.box[0] >= 24 and o.box[3] - o.box[1] >= 24 for o in objects)


def test_load_objects_finds_coco2017_names(tmp_path, synthetic_root):
    """A COCO 2017 layout (annotations/instances_val2017.json, val2017/) gives the same objects as
    the synthetic set's own names, with the image paths in val2017/."""
    root = tmp_path / "coco"
    os.makedirs(root / "annotations")
    os.symlink(os.path.join(synthetic_root, "val"), root / "val2017")
    with open(os.path.join(synthetic_root, "annotations", "instances_val.json")) as f:
        ann = f.read()
    (root / "annotations" / "instances_val2017.json").write_text(ann)
    want = probe.load_objects(synthetic_root, "val", min_size=24)
    got = probe.load_objects(str(root), "val", min_size=24)
    assert [(o.box, o.category) for o in got] == [(o.box, o.category) for o in want]
    assert all(o.image_path.startswith(str(root / "val2017")) and os.path.isfile(o.image_path) for o in got)


def test_summarize():
    s = probe.summarize(np.array([1.0, 2.0, 3.0, 4.0, np.nan]))
    assert s["n"] == 4 and s["mean"] == 2.5 and s["q25"] == 1.75 and s["q75"] == 3.25
    assert s["std"] == pytest.approx(np.std([1, 2, 3, 4]))


# --- disturbed O-KNN: the image replacement --------------------------------------------------------------

def test_replace_background_pixelwise():
    rng = np.random.default_rng(6)
    image = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    background = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)  # same size: no resampling
    boxes = np.array([[2.5, 3.0, 10.2, 12.0], [20.0, 15.0, 40.0, 30.0], [8.0, 10.0, 12.0, 20.0]])
    out = disturbed.replace_background(image, boxes, background)
    for y in range(30):
        for x in range(40):
            # pixel square [x,x+1)×[y,y+1) meets a box with positive area?
            inside = any(x + 1 > x1 and x < x2 and y + 1 > y1 and y < y2 for x1, y1, x2, y2 in boxes)
            np.testing.assert_array_equal(out[y, x], image[y, x] if inside else background[y, x])
    assert not np.array_equal(out, image) and not np.array_equal(out, background)


def test_replace_background_resizes_other_image():
    image = np.full((20, 30, 3), 7, np.uint8)
    background = np.full((50, 10, 3), 200, np.uint8)
    out = disturbed.replace_background(image, np.array([[0, 0, 5, 5]]), background)
    assert out.shape == image.shape
    assert (out[:5, :5] == 7).all() and (out[5:] == 200).all() and (out[:, 5:] == 200).all()


def test_background_index_is_deterministic_and_never_self():
    idx = disturbed.background_index(50, seed=3)
    assert (idx != np.arange(50)).all() and ((0 <= idx) & (idx < 50)).all()
    np.testing.assert_array_equal(idx, disturbed.background_index(50, seed=3))
    assert not np.array_equal(idx, disturbed.background_index(50, seed=4))
    with pytest.raises(ValueError, match="at least 2 images"):
        disturbed.background_index(1)


def test_background_replacer_hook(tmp_path):
    import cv2
    paths = []
    for i in range(4):
        paths.append(str(tmp_path / f"{i}.png"))
        cv2.imwrite(paths[-1], np.full((10, 10, 3), 10 * i, np.uint8))
    records = [(p, None, None, None) for p in paths]
    hook = disturbed.BackgroundReplacer(seed=0)
    out = hook(records, 2, np.full((10, 10, 3), 20, np.uint8), np.array([[0, 0, 3, 3]]))
    partner = disturbed.background_index(4, 0)[2]
    assert (out[:3, :3] == 20).all() and (out[5:, 5:] == 10 * partner).all() and partner != 2


def test_oknn_images_through_hook(synthetic_root):
    """The hook sees each image with its selected boxes; ObjectImages then resizes what it returns."""
    from d3ssl.eval import oknn
    records = oknn.load_objects(synthetic_root, "val", max_objects_per_image=2)
    seen = []

    def hook(recs, i, image, boxes):
        seen.append((i, image.shape, boxes.copy()))
        return np.zeros_like(image)

    plain = oknn.ObjectImages(records, 64)
    hooked = oknn.ObjectImages(records, 64, image_hook=hook)
    image, boxes, _ = hooked[1]
    assert seen[0][0] == 1 and seen[0][1][:2] == (records[1][3][1], records[1][3][0])
    np.testing.assert_array_equal(seen[0][2], records[1][1])
    black = (0 - MEAN) / STD
    np.testing.assert_allclose(image.numpy(), np.broadcast_to(black[:, None, None], (3, 64, 64)), rtol=1e-5)
    torch.testing.assert_close(boxes, plain[1][1])


def test_disturbed_oknn_runs_and_differs(synthetic_root):
    from d3ssl.eval import oknn
    from d3ssl.model import ResNetC4
    backbone = ResNetC4("resnet18")
    kw = dict(max_objects_per_image=2, image_size=64, batch_size=8, k=5)
    clean_x, _ = oknn.extract_object_features(backbone, synthetic_root, "val", 2, 64)
    dist_x, labels = oknn.extract_object_features(backbone, synthetic_root, "val", 2, 64,
                                                  image_hook=disturbed.BackgroundReplacer(0))
    assert clean_x.shape == dist_x.shape and not torch.allclose(clean_x, dist_x)
    res = disturbed.evaluate_disturbed_oknn(backbone, synthetic_root, seed=0, **kw)
    assert 0 <= res["top1"] <= res["top5"] <= 100 and res["num_queries"] > 0


@pytest.mark.parametrize("disturb_bank", [True, False])
def test_disturbed_oknn_disturbs_every_image_it_should(synthetic_root, monkeypatch, disturb_bank):
    """The background hook runs once on every query image and, with disturb_bank, on every bank
    image, each time with the boxes O-KNN selected for that image."""
    from d3ssl.eval import oknn
    from d3ssl.model import ResNetC4
    calls = []
    replace = disturbed.BackgroundReplacer.__call__

    def spy(self, records, index, image, boxes):
        calls.append((os.path.basename(os.path.dirname(records[index][0])), index, boxes.copy()))
        return replace(self, records, index, image, boxes)

    monkeypatch.setattr(disturbed.BackgroundReplacer, "__call__", spy)
    backbone = ResNetC4("resnet18")
    kw = dict(max_objects_per_image=2, image_size=64, batch_size=8, k=5)
    disturbed.evaluate_disturbed_oknn(backbone, synthetic_root, seed=0, disturb_bank=disturb_bank, **kw)
    want = []
    for split, per_image in (("train", 2), ("val", None)):
        if split == "train" and not disturb_bank:
            continue
        want += [(split, i, r[1]) for i, r in enumerate(oknn.load_objects(synthetic_root, split, per_image))]
    key = lambda c: (c[0], c[1])  # noqa: E731
    assert sorted(map(key, calls)) == sorted(map(key, want))
    for (_, _, got), (_, _, boxes) in zip(sorted(calls, key=key), sorted(want, key=key)):
        np.testing.assert_array_equal(got, boxes)


def test_oknn_images_shrink_without_aliasing(tmp_path):
    """A 256-px image of 1-px stripes, one bright column in four, shrunk to 64 px for O-KNN: every
    output pixel averages four columns (63.75), as the training views' resize does. A plain bilinear
    resize samples between two dark columns and would give 0."""
    import cv2
    from d3ssl.data.cpu_loader import resize_square
    from d3ssl.eval import oknn
    img = np.zeros((256, 256, 3), np.uint8)
    img[:, ::4] = 255
    path = str(tmp_path / "stripes.png")
    cv2.imwrite(path, img)
    records = [(path, np.array([[0, 0, 128, 128]], np.float32), np.array([1]), (256, 256))]
    image, boxes, _ = oknn.ObjectImages(records, 64)[0]
    pixels = image.numpy().transpose(1, 2, 0) * STD * 255 + MEAN * 255
    np.testing.assert_allclose(pixels, 63.75, atol=0.6)
    np.testing.assert_allclose(pixels, resize_square(img, 64), atol=1e-3)
    torch.testing.assert_close(boxes, torch.tensor([[0.0, 0.0, 32.0, 32.0]]))
    assert cv2.resize(img, (64, 64), interpolation=cv2.INTER_LINEAR).max() == 0  # what aliasing looks like


# --- the report ---------------------------------------------------------------------------------------

def _write_checkpoint(path, arch="resnet18"):
    import dataclasses
    from d3ssl.model import ModelConfig, build_method
    cfg = ModelConfig(method="soco", arch=arch, proj_hidden=32, pred_hidden=32, proj_dim=16)
    torch.save({"model": build_method(cfg).state_dict(), "config": {"model": dataclasses.asdict(cfg)}}, path)


def test_report_on_tiny_dataset(tmp_path, synthetic_root):
    from d3ssl.eval import report
    run = tmp_path / "runs" / "tiny" / "checkpoints"
    os.makedirs(run)
    _write_checkpoint(str(run / "step_00000002.pt"))
    out = tmp_path / "report"
    results = report.main(["--ckpt", str(tmp_path / "runs" / "tiny"), "--data", synthetic_root, "--out", str(out),
                           "--pairs", "3", "--objects", "3", "--image-size", "64", "--cr-image-size", "64",
                           "--object-size", "24", "--tile-size", "32", "--k", "5", "--max-train-images", "4", "--no-progress"])
    assert list(results) == ["tiny", "random-init"]
    text = (out / "report.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| tiny ") or line.startswith("| random-init ")]
    assert len(rows) == 6  # one row per network in each of the three tables
    assert all(len(r.strip("|").split("|")) in (7, 1 + len(probe.LAYERS)) for r in rows)
    for png in ("cr.png", "mcs.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    saved = json.loads((out / "results.json").read_text())["results"]
    for name in ("tiny", "random-init"):
        assert saved[name]["arch"] == "resnet18"
        assert set(saved[name]["cr"]) == set(probe.LAYERS) and saved[name]["mcs"]["layer4"]["n"] == 3
        assert 0 <= saved[name]["disturbed_oknn"]["top1"] <= 100
        share = saved[name]["oknn"]["position_share"]
        assert 0 <= share <= 1 and f"| {100 * share:.0f} % |" in text


def _fake_results(backbone, data_root, objects, settings, device, progress=True):
    """evaluate_network's result shape, for tests of what the report does around it."""
    stats = probe.summarize(np.ones(3))
    oknn = {"top1": 1.0, "top5": 2.0, "bank_size": 3, "num_queries": 4, "position_share": 0.5}
    return {"oknn": oknn, "disturbed_oknn": oknn, "cr": {layer: stats for layer in probe.LAYERS},
            "mcs": {layer: stats for layer in probe.LAYERS}}


def test_report_evaluates_the_splits_it_is_given(tmp_path, synthetic_root, monkeypatch):
    """--train-split and --val-split reach O-KNN and disturbed O-KNN (they had always used train
    and val while the report named the given splits)."""
    from d3ssl.eval import report
    seen = {}

    class Enough(Exception):
        pass

    def record(name):
        def measure(backbone, data_root, **kw):
            seen[name] = (kw["train_split"], kw["val_split"])
            if len(seen) == 2:
                raise Enough
            return {"top1": 0.0}
        return measure
    monkeypatch.setattr(report, "evaluate_oknn", record("oknn"))
    monkeypatch.setattr(report, "evaluate_disturbed_oknn", record("disturbed"))
    with pytest.raises(Enough):
        report.main(["--data", synthetic_root, "--out", str(tmp_path / "o"), "--arch", "resnet18",
                     "--train-split", "val", "--val-split", "train", "--no-progress"])
    assert seen == {"oknn": ("val", "train"), "disturbed": ("val", "train")}
    with pytest.raises(SystemExit, match="every query would find itself in the bank"):
        report.main(["--data", synthetic_root, "--out", str(tmp_path / "o"), "--train-split", "val",
                     "--no-progress"])


def test_report_of_a_diverged_network_says_not_finite_and_writes_strict_json(tmp_path, synthetic_root,
                                                                             monkeypatch):
    """A network whose features are not finite: "not finite" in report.md (never "nan") and null
    in results.json; the finite network's numbers are untouched."""
    from d3ssl.eval import report

    def results(backbone, *args, **kwargs):
        out = _fake_results(backbone, *args, **kwargs)
        calls.append(backbone)
        if len(calls) == 1:  # the first network (the checkpoint's) diverged
            nan = float("nan")
            bad = {**out["oknn"], "top1": nan, "top5": nan, "position_share": nan}
            stats = probe.summarize(np.full(3, nan))
            out = {"oknn": bad, "disturbed_oknn": bad, "cr": {layer: stats for layer in probe.LAYERS},
                   "mcs": {layer: stats for layer in probe.LAYERS}}
        return out
    calls = []
    run = tmp_path / "runs" / "tiny" / "checkpoints"
    os.makedirs(run)
    _write_checkpoint(str(run / "step_00000002.pt"))
    monkeypatch.setattr(report, "evaluate_network", results)
    report.main(["--ckpt", str(tmp_path / "runs" / "tiny"), "--data", synthetic_root, "--out",
                 str(tmp_path / "o"), "--no-progress"])
    text = (tmp_path / "o" / "report.md").read_text()
    assert "nan" not in text.lower() and "| tiny | resnet18 | not finite | not finite |" in text
    assert "| random-init | resnet18 | 1.00 | 2.00 |" in text and "Not finite: the features of tiny" in text
    saved = json.loads((tmp_path / "o" / "results.json").read_text(),
                       parse_constant=lambda c: pytest.fail(f"results.json holds {c}"))["results"]
    assert saved["tiny"]["oknn"]["top1"] is None and saved["tiny"]["cr"]["conv1"]["mean"] is None
    assert saved["random-init"]["oknn"]["top1"] == 1.0


def test_report_gives_each_checkpoint_its_own_row(tmp_path, synthetic_root, monkeypatch):
    """Two checkpoints of one run folder were both named after it, and one row overwrote the other."""
    from d3ssl.eval import report
    monkeypatch.setattr(report, "evaluate_network", _fake_results)
    run = tmp_path / "runs" / "tiny" / "checkpoints"
    os.makedirs(run)
    for step in (2, 4):
        _write_checkpoint(str(run / f"step_0000000{step}.pt"))
    ckpts = [str(run / "step_00000002.pt"), str(run / "step_00000004.pt")]
    results = report.main(sum((["--ckpt", c] for c in ckpts), []) + [
        "--data", synthetic_root, "--out", str(tmp_path / "o"), "--no-progress", "--no-random"])
    assert list(results) == ["tiny (step_00000002.pt)", "tiny (step_00000004.pt)"]
    with pytest.raises(SystemExit, match="--label: each network needs its own label"):
        report.main(sum((["--ckpt", c, "--label", "same"] for c in ckpts), []) + [
            "--data", synthetic_root, "--out", str(tmp_path / "o"), "--no-progress"])


def test_report_errors(tmp_path, synthetic_root):
    from d3ssl.eval import report
    base = ["--out", str(tmp_path / "o"), "--no-progress"]
    with pytest.raises(SystemExit, match="missing.pt"):
        report.main(["--ckpt", str(tmp_path / "missing.pt"), "--data", synthetic_root] + base)
    os.makedirs(tmp_path / "noann" / "val")
    with pytest.raises(SystemExit, match="no COCO-format split 'train'.*instances_train.json"):
        report.main(["--data", str(tmp_path / "noann"), "--arch", "resnet18"] + base)
    with pytest.raises(SystemExit, match="nothing to evaluate"):
        report.main(["--data", synthetic_root, "--no-random"] + base)
    torch.save({"state_dict": {}}, str(tmp_path / "foreign.pt"))
    with pytest.raises(SystemExit, match="not a d3ssl training checkpoint"):
        report.main(["--ckpt", str(tmp_path / "foreign.pt"), "--data", synthetic_root] + base)


def test_comparison_presets_differ_only_in_method():
    from train.config import make_config, to_dict

    def flat(d, prefix=""):
        for k, v in d.items():
            yield from flat(v, prefix + k + ".") if isinstance(v, dict) else [(prefix + k, v)]

    ours, soco, no_dp = (dict(flat(to_dict(make_config(p))))
                         for p in ("compare-d3ssl", "compare-soco", "compare-no_dp"))
    assert {k for k in ours if ours[k] != soco[k]} == {"preset", "model.method"}
    assert ours["model.method"] == "d3ssl" and soco["model.method"] == "soco"
    assert {k for k in ours if ours[k] != no_dp[k]} == {"preset", "model.use_dp", "region.depositioning"}
    assert not no_dp["model.use_dp"] and not no_dp["region.depositioning"]
    from d3ssl.eval.compare import METHODS, parse_methods, train_command
    assert parse_methods("no_dp, d3ssl") == ["no_dp", "d3ssl"] and list(METHODS) == ["d3ssl", "soco", "no_dp"]
    for bad in ("d3ssl,byol", "", "soco,soco"):
        with pytest.raises(ValueError, match="--methods"):
            parse_methods(bad)
    cmd = train_command("compare-soco", "o", "soco", ["run.epochs=2"], None)
    assert cmd[1:] == ["-m", "train.run", "--preset", "compare-soco", "--out", "o", "--name", "soco", "--resume",
                       "auto", "--set", "run.epochs=2"]


def test_compare_reports_on_the_data_the_runs_trained_on(tmp_path):
    """The report's synthetic set is the trainer's: same scene settings (objects, sizes), same folder."""
    from d3ssl.data.synthetic import ensure_synthetic
    from d3ssl.eval.compare import eval_data_root
    from train.config import make_config

    sets = [f"data.synthetic_root={tmp_path}", "data.synthetic_train=3", "data.synthetic_val=2",
            "data.synthetic_objects=1,2", "data.synthetic_object_frac=0.4,0.5"]
    d = make_config("compare-d3ssl", dict(s.split("=", 1) for s in sets)).data
    trained_on = ensure_synthetic(d.synthetic_root, seed=d.synthetic_seed, num_train=d.synthetic_train,
                                  num_val=d.synthetic_val, image_size=d.synthetic_size,
                                  objects=d.synthetic_objects, object_frac=d.synthetic_object_frac, workers=1)
    assert eval_data_root("compare-d3ssl", sets, None) == trained_on
    assert eval_data_root("compare-d3ssl", sets, "/some/coco") == "/some/coco"


def test_compare_waits_for_an_interrupted_training_to_save(tmp_path, monkeypatch, capsys):
    """Ctrl-C reaches compare and its training alike: compare ignores it while the training
    finishes its step and saves (subprocess.call would SIGKILL it), then stops with its status."""
    import signal

    from d3ssl.eval import compare
    seen = []

    def training(cmd):
        seen.append(signal.getsignal(signal.SIGINT))
        return 128 + signal.SIGINT
    monkeypatch.setattr(compare.subprocess, "call", training)
    before = signal.getsignal(signal.SIGINT)
    assert compare.main(["--out", str(tmp_path), "--methods", "d3ssl,soco"]) == 130
    assert seen == [signal.SIG_IGN] and signal.getsignal(signal.SIGINT) is before   # one training, then put back
    assert "interrupted while training d3ssl: it saved its step; the same command goes on" in capsys.readouterr().err


def test_report_and_compare_refuse_bad_arguments_before_any_work(tmp_path, capsys):
    from d3ssl.eval import compare, report
    with pytest.raises(SystemExit, match="--skip-train: no trained run for d3ssl"):
        compare.main(["--out", str(tmp_path / "cmp"), "--skip-train", "--methods", "d3ssl"])
    with pytest.raises(SystemExit) as stop:
        compare.main(["--out", str(tmp_path / "cmp"), "--max-train-images", "1"])
    assert stop.value.code == 2 and "--max-train-images must be at least 2" in capsys.readouterr().err
    for argv, message in ((["--device", "tpu"], "--device tpu"), (["--data", str(tmp_path)], "--data: no COCO")):
        with pytest.raises(SystemExit) as stop:
            compare.main(["--out", str(tmp_path / "cmp"), *argv])
        assert stop.value.code == 2 and message in capsys.readouterr().err, argv
    assert not os.path.exists(tmp_path / "cmp")
    for argv, message in ((["--pairs", "0"], "--pairs: must be >= 1"),
                          (["--ckpt", "x", "--arch", "resnet18"], "--arch sets the random-init"),
                          (["--image-size", "16"], "--image-size must be >= 32"),
                          (["--device", "tpu"], "--device tpu"),
                          (["--gap", "-2"], "--gap must be >= 0"),
                          (["--cr-image-size", "128"], "--object-size 96 twice and --gap 0 do not fit"),
                          (["--cr-image-size", "250"], "--cr-image-size must be a multiple of 32"),
                          (["--tile-size", "50"], "--tile-size must be a multiple of 32"),
                          (["--max-val-images", "1"], "--max-val-images must be at least 2"),
                          (["--max-train-images", "1"], "--max-train-images must be at least 2")):
        with pytest.raises(SystemExit) as stop:
            report.main(["--data", str(tmp_path), "--out", str(tmp_path / "rep"), *argv])
        assert stop.value.code == 2 and message in capsys.readouterr().err, argv
    assert not os.path.exists(tmp_path / "rep")

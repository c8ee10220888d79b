import hashlib
import json
import os

import cv2
import numpy as np
import pytest

from d3ssl.data.datasets import open_dataset
from d3ssl.data.synthetic import CLASSES, MAX_OBJECTS, ensure_synthetic

SMALL = dict(num_train=10, num_val=4, image_size=(112, 144), workers=1)


def _digest(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in sorted(files):
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return ensure_synthetic(str(tmp_path_factory.mktemp("a")), seed=3, **SMALL)


def test_deterministic_and_seed_dependent(synth, tmp_path):
    again = ensure_synthetic(str(tmp_path / "b"), seed=3, **{**SMALL, "workers": 2})
    assert _digest(synth) == _digest(again)          # same bytes, whatever the worker count
    other = ensure_synthetic(str(tmp_path / "c"), seed=4, **SMALL)
    assert _digest(other)["train/000000.jpg"] != _digest(synth)["train/000000.jpg"]


def test_idempotent(synth):
    path = os.path.join(synth, "train", "000000.jpg")
    before = os.stat(path).st_mtime_ns
    assert ensure_synthetic(os.path.dirname(synth), seed=3, **SMALL) == synth
    assert os.stat(path).st_mtime_ns == before
    assert not [d for d in os.listdir(os.path.dirname(synth)) if ".tmp-" in d]


def test_classes_differ_in_shape_and_texture():
    assert len(CLASSES) >= 10
    assert len({c[1] for c in CLASSES}) == len(CLASSES)      # every class its own shape
    assert len({c[2] for c in CLASSES}) == len(CLASSES)      # and its own texture


@pytest.mark.parametrize("split", ["train", "val"])
def test_ground_truth_valid(synth, split):
    ds = open_dataset(synth, split)
    with open(os.path.join(synth, "annotations", f"instances_{split}.json")) as f:
        ann = json.load(f)
    assert len(ds) == (SMALL["num_train"] if split == "train" else SMALL["num_val"])
    cats = {c["id"] for c in ann["categories"]}
    assert cats == set(range(1, len(CLASSES) + 1)) and all(c["name"] for c in ann["categories"])
    per_image = {}
    for i in range(len(ds)):
        data = ds.read_bytes(i)
        assert data[:3] == b"\xff\xd8\xff"                  # JPEG
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        info = ds.coco.imgs[ds.image_id(i)]
        assert img.shape[:2] == (info["height"], info["width"])
        assert 112 <= info["width"] <= 144 and 112 <= info["height"] <= 144
        anns = ds.coco.loadAnns(ds.coco.getAnnIds(imgIds=ds.image_id(i)))
        per_image[i] = len(anns)
        for a in anns:
            x, y, w, h = a["bbox"]
            assert a["iscrowd"] == 0 and a["category_id"] in cats
            assert 0 <= x and 0 <= y and w > 0 and h > 0
            assert x + w <= info["width"] and y + h <= info["height"]
            assert 0 < a["area"] <= w * h
            # the box holds the object, not the background: its pixels differ from the background's
            region = img[y:y + h, x:x + w].astype(np.float32)
            assert region.std() > 5
    assert all(1 <= n <= MAX_OBJECTS for n in per_image.values())
    assert np.mean([n >= 3 for n in per_image.values()]) >= 0.75
    # some objects touch or overlap
    boxes = [(a["image_id"], a["bbox"]) for a in ann["annotations"]]
    touching = 0
    for i, (img_a, a) in enumerate(boxes):
        for img_b, b in boxes[i + 1:]:
            if img_a == img_b and a[0] <= b[0] + b[2] and b[0] <= a[0] + a[2] and \
                    a[1] <= b[1] + b[3] and b[1] <= a[1] + a[3]:
                touching += 1
    assert touching > 0


def test_colour_does_not_give_the_class_away(tmp_path):
    """The mean colour of an object's box predicts its class hardly better than chance."""
    root = ensure_synthetic(str(tmp_path), seed=1, num_train=60, num_val=1, image_size=(128, 128), workers=2)
    ds = open_dataset(root, "train")
    feats, labels = [], []
    for i in range(len(ds)):
        img = cv2.imread(ds.path(i))
        for a in ds.coco.loadAnns(ds.coco.getAnnIds(imgIds=ds.image_id(i))):
            x, y, w, h = a["bbox"]
            feats.append(img[y:y + h, x:x + w].reshape(-1, 3).mean(0))
            labels.append(a["category_id"])
    feats, labels = np.array(feats), np.array(labels)
    # leave-one-out nearest neighbour on mean colour
    d = ((feats[:, None] - feats[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    acc = (labels[d.argmin(1)] == labels).mean()
    assert acc < 3.0 / len(CLASSES), acc


def test_object_count_and_size_follow_the_arguments(tmp_path):
    """objects=(1,2), object_frac=(0.4,0.6): at most two objects per image, each box (the visible part,
    so it may be smaller than the drawn square) no larger than 0.6 of the shorter side, and the data
    land in their own cache folder, apart from the default scenes."""
    kw = dict(num_train=12, num_val=1, image_size=(96, 112), workers=1)
    root = ensure_synthetic(str(tmp_path), seed=2, objects=(1, 2), object_frac=(0.4, 0.6), **kw)
    default = ensure_synthetic(str(tmp_path), seed=2, **kw)
    assert root != default
    with open(os.path.join(root, "annotations", "instances_train.json")) as f:
        ann = json.load(f)
    short = {im["id"]: min(im["width"], im["height"]) for im in ann["images"]}
    counts = np.bincount([a["image_id"] for a in ann["annotations"]], minlength=len(short) + 1)[1:]
    assert counts.min() >= 1 and counts.max() <= 2
    sides = [max(a["bbox"][2], a["bbox"][3]) / short[a["image_id"]] for a in ann["annotations"]]
    assert max(sides) <= 0.6 + 1e-6 and np.median(sides) >= 0.3
    with open(os.path.join(default, "annotations", "instances_train.json")) as f:
        assert len(json.load(f)["annotations"]) > len(ann["annotations"])


@pytest.mark.parametrize("kw", [dict(objects=(0, 2)), dict(objects=(3, 2)), dict(object_frac=(0.0, 0.5)),
                                dict(object_frac=(0.5, 1.2))])
def test_bad_scene_arguments(tmp_path, kw):
    with pytest.raises(ValueError, match="objects|object_frac"):
        ensure_synthetic(str(tmp_path), num_train=1, num_val=0, workers=1, **kw)

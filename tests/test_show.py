"""python -m d3ssl.augment.show: through the data pipeline for a dataset with a proposals store, with
views built on the spot for a plain image; region stage settings from --set."""
import json
import os

import numpy as np
import pytest
import torch

from d3ssl.augment import show

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """8 synthetic scenes with a proposals store (their ground-truth boxes) where training puts it."""
    from d3ssl.data.datasets import open_dataset
    from d3ssl.data.proposals import default_store_path, write_store
    from d3ssl.data.synthetic import ensure_synthetic
    root = ensure_synthetic(str(tmp_path_factory.mktemp("syn")), seed=2, num_train=8, num_val=1,
                            image_size=(96, 128), workers=1)
    ds = open_dataset(root, "train")
    with open(os.path.join(root, "annotations", "instances_train.json")) as f:
        gt = json.load(f)
    by_name = {im["file_name"]: im for im in gt["images"]}
    boxes, sizes = [], []
    for key in ds.keys:
        im = by_name[key]
        b = [[x, y, x + w, y + h] for a in gt["annotations"] if a["image_id"] == im["id"]
             for x, y, w, h in [a["bbox"]]]
        boxes.append(np.array(b or [[0, 0, im["width"], im["height"]]], np.float32))
        sizes.append((im["width"], im["height"]))
    write_store(default_store_path(ds), ds.keys, boxes, np.array(sizes), np.zeros(len(ds), np.uint8))
    return root


def _png(path):
    data = path.read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_dataset_goes_through_the_data_pipeline(dataset, tmp_path, capsys):
    out = show.main([dataset, "--out", str(tmp_path / "g.png"), "--num", "3", "--size", "64", "--k", "2",
                     "--set", "dp_boxes=1", "--set", "region.prm=false", "--set", "rbj=false"])
    assert _png(tmp_path / "g.png") and "the data pipeline" in capsys.readouterr().out
    assert out.x1.shape == (3, 3, 64, 64)
    # colour augmentation off and PRM off: x̂1 differs from x1 only inside the proposals (PRC)
    inside = torch.zeros(3, 64, 64, dtype=torch.bool)
    for i, j in out.valid.nonzero().tolist():
        x1, y1, x2, y2 = out.boxes_x1[i, j].tolist()
        inside[i, max(int(y1) - 1, 0):int(y2) + 2, max(int(x1) - 1, 0):int(x2) + 2] = True
    erased = (out.x1_hat != out.x1).any(1)
    assert erased.any() and not (erased & ~inside).any()
    assert torch.equal(out.valid_x3.sum(1), out.valid.any(1).long())     # dp_boxes=1 reached the stage


def test_image_file_gets_views_built_here(dataset, tmp_path, capsys):
    image = os.path.join(dataset, "train", sorted(os.listdir(os.path.join(dataset, "train")))[0])
    out = show.main([image, "--out", str(tmp_path / "one.png"), "--num", "2", "--size", "32"])
    assert _png(tmp_path / "one.png") and "(2 draws of the 1 image(s) of" in capsys.readouterr().out
    assert out.x3.shape == (2, 3, 32, 32) and torch.equal(out.valid_x3, out.valid)
    assert not torch.equal(out.x2[0], out.x2[1])        # each draw its own views


def test_a_path_that_is_no_image_is_an_error(tmp_path):
    for path, match in ((tmp_path / "missing.jpg", r"^error: .*missing.jpg does not exist$"),
                        (tmp_path, r"^error: no images \(.*\) in folder"),
                        (tmp_path / "bad.jpg", r"^error: could not read image .*bad.jpg$")):
        if path.name == "bad.jpg":
            path.write_bytes(b"not an image")
        with pytest.raises(SystemExit, match=match):
            show.main([str(path), "--out", str(tmp_path / "x.png")])


@pytest.mark.parametrize("item, match", [
    ("dp_boxes=x", "dp_boxes: cannot read 'x' as int"),
    ("nope=1", "NAME one of"),
    ("dp_boxes=-2", "dp_boxes must be an int >= 0"),
    ("prc=maybe", "prc: cannot read 'maybe' as bool"),
])
def test_bad_settings_are_refused(dataset, tmp_path, item, match):
    with pytest.raises(SystemExit, match=match):
        show.main([dataset, "--out", str(tmp_path / "x.png"), "--set", item])


def test_an_instances_json_is_a_dataset_as_for_training(dataset, tmp_path, capsys):
    import glob
    json_file = glob.glob(os.path.join(dataset, "annotations", "instances_train*.json"))[0]
    show.main([json_file, "--out", str(tmp_path / "j.png"), "--num", "2", "--size", "32"])
    assert _png(tmp_path / "j.png") and "the data pipeline" in capsys.readouterr().out
    os.makedirs(tmp_path / "c" / "annotations")
    other = tmp_path / "c" / "annotations" / "instances_train.json"
    other.write_text(open(json_file).read())
    with pytest.raises(SystemExit, match=r"^error: .*instances_train.json: "):
        show.main([str(other), "--out", str(tmp_path / "k.png")])

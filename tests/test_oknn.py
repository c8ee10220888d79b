"""O-KNN on features whose answer is known, and object features on a tiny COCO-format set."""
import json
import math
import os
import warnings
from dataclasses import asdict

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from d3ssl.data.batch import IMAGENET_MEAN, IMAGENET_STD
from d3ssl.eval import oknn
from d3ssl.model import ModelConfig, ResNetC4, build_method


# Tiny tensors: one intra-op thread (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def clustered(n_classes, per_class, d, g, noise=0.05):
    centres = F.normalize(torch.randn(n_classes, d, generator=g), dim=1)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    x = centres[labels] + noise * torch.randn(len(labels), d, generator=g)
    return F.normalize(x, dim=1), labels * 7 + 3          # non-contiguous label ids on purpose


def ref_knn(bank, bank_y, q, q_y, k, t):
    """Loop-per-query numpy reference of the weighted vote."""
    bank, q = bank.double().numpy(), q.double().numpy()
    top1 = top5 = 0
    for i in range(len(q)):
        sim = bank @ q[i]
        nn_idx = np.argsort(-sim, kind="stable")[:k]
        votes = {}
        for j in nn_idx:
            votes[int(bank_y[j])] = votes.get(int(bank_y[j]), 0.0) + math.exp(sim[j] / t)
        ranked = sorted(votes, key=lambda c: -votes[c])
        top1 += ranked[0] == int(q_y[i])
        top5 += int(q_y[i]) in ranked[:5]
    return 100 * top1 / len(q), 100 * top5 / len(q)


def test_clustered_features_are_all_right():
    g = torch.Generator().manual_seed(0)
    x, y = clustered(6, 30, 32, g)
    bank, bank_y, q, q_y = x[::2], y[::2], x[1::2], y[1::2]
    assert oknn.o_knn(bank, bank_y, q, q_y) == {"top1": 100.0, "top5": 100.0}


def test_random_labels_are_near_chance():
    g = torch.Generator().manual_seed(1)
    bank = F.normalize(torch.randn(2000, 16, generator=g), dim=1)
    q = F.normalize(torch.randn(2000, 16, generator=g), dim=1)
    res = oknn.o_knn(bank, torch.randint(0, 10, (2000,), generator=g), q,
                     torch.randint(0, 10, (2000,), generator=g))
    assert 6 < res["top1"] < 14 and 42 < res["top5"] < 58


def test_vote_is_weighted_by_exp_sim_over_t():
    # two class-0 neighbours at cos 0.5 against one class-1 neighbour at cos 0.6:
    # counts say 0, weights say 1 (exp(0.6/0.07) > 2 exp(0.5/0.07)); with T = 1 the counts win.
    q = torch.tensor([[1.0, 0.0, 0.0]])
    def at(c, sign):
        return [c, sign * math.sqrt(1 - c * c), 0.0]
    bank = torch.tensor([at(0.5, 1), at(0.5, -1), [0.6, 0.0, 0.8], [-1.0, 0.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 2])
    assert math.exp(0.6 / 0.07) > 2 * math.exp(0.5 / 0.07)
    assert oknn.o_knn(bank, labels, q, torch.tensor([1]), k=3)["top1"] == 100.0
    assert oknn.o_knn(bank, labels, q, torch.tensor([0]), k=3) == {"top1": 0.0, "top5": 100.0}
    assert oknn.o_knn(bank, labels, q, torch.tensor([0]), k=3, temperature=1.0)["top1"] == 100.0
    assert oknn.o_knn(bank, labels, q, torch.tensor([2]), k=3)["top5"] == 0.0    # not among the k


def test_matches_loop_reference():
    g = torch.Generator().manual_seed(2)
    x, y = clustered(8, 25, 8, g, noise=0.6)
    perm = torch.randperm(len(x), generator=g)
    x, y = x[perm], y[perm]
    bank, bank_y, q, q_y = x[:150], y[:150], x[150:], y[150:]
    res = oknn.o_knn(bank, bank_y, q, q_y, k=7, chunk_size=13)
    want = ref_knn(bank, bank_y, q, q_y, 7, 0.07)
    assert (res["top1"], res["top5"]) == pytest.approx(want)
    assert 0 < res["top1"] < 100


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="share D"):
        oknn.o_knn(torch.randn(3, 4), torch.zeros(3), torch.randn(2, 5), torch.zeros(2))


# --------------------------------------------------------------------------- tiny COCO-format set
def write_coco(root, split, images):
    """images: list of (w, h, [(category_id, x, y, bw, bh), ...])."""
    (root / split).mkdir(parents=True)
    (root / "annotations").mkdir(exist_ok=True)
    rng = np.random.default_rng(len(split))
    imgs, anns = [], []
    for i, (w, h, objs) in enumerate(images):
        cv2.imwrite(str(root / split / f"{i}.png"), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        imgs.append({"id": i + 1, "file_name": f"{i}.png", "width": w, "height": h})
        for c, x, y, bw, bh in objs:
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": c, "bbox": [x, y, bw, bh],
                         "area": bw * bh, "iscrowd": 0})
    cats = [{"id": c, "name": f"c{c}"} for c in (1, 2, 3)]
    with open(root / "annotations" / f"instances_{split}.json", "w") as f:
        json.dump({"images": imgs, "annotations": anns, "categories": cats}, f)


@pytest.fixture
def tiny_coco(tmp_path):
    write_coco(tmp_path, "train", [
        (80, 60, [(1, 2, 2, 40, 40), (1, 40, 10, 30, 30), (2, 5, 40, 10, 12)]),
        (64, 64, [(1, 0, 0, 30, 30), (2, 30, 30, 20, 20), (3, 10, 40, 12, 12)]),
        (50, 70, [(3, 5, 5, 30, 40)]),
    ])
    write_coco(tmp_path, "val", [
        (60, 60, [(1, 5, 5, 30, 30), (2, 30, 20, 25, 30)]),
        (70, 50, [(3, 10, 10, 20, 20)]),
    ])
    return tmp_path


def test_bank_selection_is_class_balanced(tiny_coco):
    recs = oknn.load_objects(str(tiny_coco), "train", max_objects_per_image=2)
    # image 1: the big class-1 box, then class 2 (rarer than class 1); image 2: class 3 (unseen),
    # then class 1 and 2 are tied at one each and the larger box (class 1, 30x30) wins.
    assert [r[2].tolist() for r in recs] == [[1, 2], [3, 1], [3]]
    assert recs[0][1].tolist()[0] == [2, 2, 42, 42]
    assert sum(len(r[2]) for r in oknn.load_objects(str(tiny_coco), "train")) == 7
    with pytest.raises(FileNotFoundError, match="instances_test.json"):
        oknn.load_objects(str(tiny_coco), "test")


def test_extract_object_features_matches_direct_computation(tiny_coco):
    net = ResNetC4("resnet18")
    net.train()
    feats, labels = oknn.extract_object_features(net, str(tiny_coco), "val", None, image_size=64,
                                                 batch_size=2)
    assert net.training                                   # mode restored
    assert feats.shape == (3, 512) and labels.tolist() == [1, 2, 3]
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(3))
    # object 2 (class 2, [30,20,25,30] in a 60x60 image) by hand
    img = cv2.cvtColor(cv2.imread(str(tiny_coco / "val" / "0.png")), cv2.COLOR_BGR2RGB)
    img = cv2.resize(img, (64, 64), interpolation=cv2.INTER_LINEAR).astype(np.float32) / 255
    img = (img - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    x = torch.from_numpy(img).permute(2, 0, 1)[None]
    box = torch.tensor([[30, 20, 55, 50]], dtype=torch.float32) * 64 / 60
    net.eval()
    with torch.no_grad():
        r = torchvision.ops.roi_align(net.c5(x), [box], 7, 1 / 32, -1, True)
    want = F.normalize(r.mean(dim=(2, 3)), dim=1)[0]
    torch.testing.assert_close(feats[1], want, rtol=1e-4, atol=1e-5)


def test_position_share():
    g = torch.Generator().manual_seed(0)
    centres = torch.rand(500, 2, generator=g, dtype=torch.float64)
    mix = torch.randn(2, 32, generator=g, dtype=torch.float64)
    noise = torch.randn(500, 32, generator=g, dtype=torch.float64)
    pos = (centres - 0.5) @ mix
    assert oknn.position_share(pos + 3.0, centres) == pytest.approx(1.0, abs=1e-9)   # all position
    assert oknn.position_share(noise, centres) < 0.02                                  # none
    # half of the variance from position, half independent of it
    half = pos / pos.std() + noise / noise.std()
    assert oknn.position_share(half, centres) == pytest.approx(0.5, abs=0.05)
    assert oknn.position_share(torch.ones(5, 3), torch.rand(5, 2)) == 0.0
    same_x = centres.clone()
    same_x[:, 0] = 0.5                                   # rank-deficient centres: y alone explains
    only_y = (same_x[:, 1:] - 0.5) @ mix[1:]
    assert oknn.position_share(only_y, same_x) == pytest.approx(1.0, abs=1e-9)
    bad = noise.clone()
    bad[3, 1] = float("nan")
    assert math.isnan(oknn.position_share(bad, centres))
    with pytest.raises(ValueError, match="centres"):
        oknn.position_share(noise, centres[:10])
    # centres follow the records: fractions of each image's own width and height
    recs = [("a", np.array([[0, 0, 10, 20]], np.float32), None, (20, 40)),
            ("b", np.array([[5, 5, 15, 15], [0, 10, 40, 30]], np.float32), None, (40, 40))]
    assert oknn.object_centres(recs).tolist() == [[0.25, 0.25], [0.25, 0.25], [0.5, 0.5]]


def test_evaluate_and_cli(tiny_coco, tmp_path, capsys):
    net = ResNetC4("resnet18")
    res = oknn.evaluate_oknn(net, str(tiny_coco), max_objects_per_image=2, image_size=64, k=3)
    assert res["bank_size"] == 5 and res["num_queries"] == 3 and 0 <= res["top1"] <= res["top5"] <= 100
    val_x, _ = oknn.extract_object_features(net, str(tiny_coco), "val", None, image_size=64)
    centres = torch.tensor([[17.5 / 60, 17.5 / 60], [42.5 / 60, 35 / 60], [20 / 70, 20 / 50]])
    assert res["position_share"] == pytest.approx(oknn.position_share(val_x, centres), rel=1e-6)

    cfg = ModelConfig(arch="resnet18", proj_hidden=16, proj_dim=8, pred_hidden=16, queue_size=4)
    method = build_method(cfg)
    with torch.no_grad():
        for p in method.online_backbone.parameters():
            p.add_(0.01)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"model": method.state_dict(), "config": {"model": asdict(cfg)}, "step": 12},
               run / "checkpoints" / "step_00000012.pt")
    torch.save({"model": {}, "config": {}}, run / "checkpoints" / "step_00000003.pt")  # newer file
    backbone, arch, path = oknn.load_backbone(str(run))
    assert arch == "resnet18" and path.endswith("step_00000012.pt")
    for a, b in zip(backbone.state_dict().values(), method.online_backbone.state_dict().values()):
        assert torch.equal(a, b)

    out = oknn.main(["--ckpt", str(run), "--data", str(tiny_coco), "--image-size", "64", "--k", "3",
                     "--objects-per-image", "2", "--device", "cpu", "--json"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["top1"] == out["top1"] and printed["arch"] == "resnet18"
    rnd = oknn.main(["--random-init", "--arch", "resnet18", "--data", str(tiny_coco), "--image-size", "64",
                     "--device", "cpu"])
    assert rnd["checkpoint"] == "random-init" and rnd["num_queries"] == 3
    with pytest.raises(FileNotFoundError, match="--ckpt"):
        oknn.load_backbone(str(tmp_path / "nothing"))


class OrientedEdgeBank(torch.nn.Module):
    """A fixed, non-learned "backbone": |response| of 16 oriented even Gabor filters (8 orientations,
    2 frequencies) on the grey image plus the 3 colour channels, average-pooled to stride 32, as C5.
    It sees local texture orientation and frequency, which is what tells the synthetic classes apart."""

    def __init__(self):
        super().__init__()
        y, x = torch.meshgrid(torch.arange(-5.0, 6.0), torch.arange(-5.0, 6.0), indexing="ij")
        filters = []
        for freq in (0.15, 0.3):                       # cycles per pixel
            for i in range(8):
                theta = math.pi * i / 8
                g = torch.exp(-(x * x + y * y) / 18) * torch.cos(2 * math.pi * freq *
                                                                 (x * math.cos(theta) + y * math.sin(theta)))
                filters.append(g - g.mean())
        self.register_buffer("filters", torch.stack(filters)[:, None])

    def c5(self, images):
        edges = F.conv2d(images.mean(1, keepdim=True), self.filters, padding=5).abs()
        return F.avg_pool2d(torch.cat([edges, images], 1), oknn.C5_STRIDE)


def test_fixed_edge_features_beat_chance_on_synthetic_set(tmp_path):
    """End to end on the embedded synthetic set: features that carry class signal must score far
    above chance (12 classes: 8.3% top-1), so the pipeline (boxes, scaling, RoIAlign, vote) is sound."""
    from d3ssl.data.synthetic import NUM_CLASSES, ensure_synthetic

    root = ensure_synthetic(root=str(tmp_path), seed=0, num_train=300, num_val=60, image_size=(128, 160),
                            workers=1)
    res = oknn.evaluate_oknn(OrientedEdgeBank(), root, image_size=128)
    assert res["num_queries"] > 300
    assert res["top1"] > 2.0 * 100.0 / NUM_CLASSES, res


def test_cli_refuses_bad_input_before_any_work(tiny_coco, tmp_path, capsys):
    """Each bad input stops the command with a one-line error (exit status 2), not a traceback."""
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    cases = [
        (["--ckpt", str(text)], "not a PyTorch checkpoint"),
        (["--ckpt", str(tmp_path / "missing")], "neither a checkpoint file nor a run folder"),
        (["--random-init", "--val-split", "test"], "no COCO-format split 'test'"),
        (["--random-init", "--data", str(tiny_coco / "annotations" / "instances_val.json")],
         f"instances_val.json' is a file: give the COCO-format folder that holds both splits' annotations/ "
         f"and images (here perhaps {str(tiny_coco)!r})"),
        (["--random-init", "--k", "0"], "--k: must be >= 1"),
        (["--random-init", "--image-size", "8"], "--image-size must be >= 32"),
        (["--random-init", "--temperature", "0"], "--temperature must be > 0"),
        (["--random-init", "--device", "tpu"], "--device"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as stop:
            oknn.main(["--arch", "resnet18", "--data", str(tiny_coco), *args])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and message in err, (args, err[-500:])


def test_bank_and_queries_from_one_split_are_refused(tiny_coco, tmp_path, capsys):
    """Every query would find itself in the bank: refused, by the library and by the CLI, also when
    the two names reach one annotation file."""
    with pytest.raises(ValueError, match="every query would find itself in the bank"):
        oknn.evaluate_oknn(ResNetC4("resnet18"), str(tiny_coco), train_split="val", image_size=64)
    os.symlink(tiny_coco / "annotations" / "instances_val.json", tiny_coco / "annotations" / "instances_v2.json")
    os.symlink(tiny_coco / "val", tiny_coco / "v2")
    with pytest.raises(SystemExit) as stop:
        oknn.main(["--random-init", "--arch", "resnet18", "--data", str(tiny_coco), "--train-split", "v2"])
    assert stop.value.code == 2
    assert "the bank split 'v2' and the query split 'val' are the same" in capsys.readouterr().err


def test_annotations_without_iscrowd_are_not_crowds(tiny_coco):
    """iscrowd is optional in COCO-format files (the CR/MCS loader already read it so)."""
    ann = tiny_coco / "annotations" / "instances_val.json"
    data = json.loads(ann.read_text())
    data["annotations"][1]["iscrowd"] = 1
    for a in data["annotations"][::2]:
        del a["iscrowd"]
    ann.write_text(json.dumps(data))
    records = oknn.load_objects(str(tiny_coco), "val")
    assert [r[2].tolist() for r in records] == [[1], [3]]   # the crowd left out, the others kept


def test_vote_stays_right_at_tiny_temperatures():
    """exp(sim / T) overflows for T below ~1/700 (every weight inf: the tie went to the lower class)
    and underflows for negative similarities (no class counted as voted for)."""
    bank = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.436], [-1.0, 0.01], [-0.99, -0.1]]), dim=1)
    bank_y = torch.tensor([0, 1, 2, 3])
    query = F.normalize(torch.tensor([[0.88, 0.47], [-1.0, 0.0]]), dim=1)   # nearest: class 1; class 2
    for t in (0.07, 1e-3, 1e-6):
        res = oknn.o_knn(bank, bank_y, query, torch.tensor([1, 2]), k=2, temperature=t)
        assert res == {"top1": 100.0, "top5": 100.0}, t
    res = oknn.o_knn(bank[2:], bank_y[2:], query[:1], torch.tensor([3]), k=2, temperature=1e-3)
    assert res == {"top1": 0.0, "top5": 100.0}   # only dissimilar neighbours, but they did vote


def test_resolve_split_accepts_the_training_loaders_layouts(tmp_path):
    """The names open_dataset trains on: COCO 2017's annotations with plain split folders, and the
    reverse; a missing image folder names the folders looked for."""
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_train2017.json").write_text("{}")
    (tmp_path / "train").mkdir()
    assert oknn.resolve_split(str(tmp_path), "train") == (
        str(tmp_path / "annotations" / "instances_train2017.json"), str(tmp_path / "train"))
    (tmp_path / "annotations" / "instances_val.json").write_text("{}")
    (tmp_path / "val2017").mkdir()
    assert oknn.resolve_split(str(tmp_path), "val")[1] == str(tmp_path / "val2017")
    (tmp_path / "annotations" / "instances_test.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no image folder .*test/ or test2017/"):
        oknn.resolve_split(str(tmp_path), "test")


def test_feature_extraction_shows_progress_over_the_images(tiny_coco, capsys):
    net = ResNetC4("resnet18")
    quiet, _ = oknn.extract_object_features(net, str(tiny_coco), "val", None, image_size=64, batch_size=1)
    assert "O-KNN features" not in capsys.readouterr().err
    loud, _ = oknn.extract_object_features(net, str(tiny_coco), "val", None, image_size=64, batch_size=1,
                                           progress=True)
    n = len(oknn.load_objects(str(tiny_coco), "val"))
    err = capsys.readouterr().err
    assert "O-KNN features, val" in err and f"0/{n} " in err   # a bar over the split's images
    torch.testing.assert_close(loud, quiet)


def test_a_voted_class_ranks_above_unvoted_ones_at_tiny_temperatures():
    """With more than 5 classes: a far neighbour's weight rounds to 0 at a tiny T; its class was
    still voted for and must rank above the classes nobody voted for (it tied with them before)."""
    bank = F.normalize(torch.tensor([[1.0, 0.0], [0.1, 0.995]] + [[-1.0, 0.0]] * 8), dim=1)
    bank_y = torch.tensor([0, 9, 1, 2, 3, 4, 5, 6, 7, 8])   # classes 1-8 are never among the k = 2
    query = torch.tensor([[1.0, 0.0]])
    for t in (0.07, 1e-2, 1e-3, 1e-6):
        res = oknn.o_knn(bank, bank_y, query, torch.tensor([9]), k=2, temperature=t)
        assert res == {"top1": 0.0, "top5": 100.0}, t


def test_non_finite_features_give_nan_with_a_warning():
    """A diverged network's NaN features used to score like a poor network (10 % top-1 here)."""
    x, y = clustered(10, 8, 16, torch.Generator().manual_seed(0))
    bank, bank_y, query, query_y = x[::2], y[::2], x[1::2], y[1::2]
    assert oknn.o_knn(bank, bank_y, query, query_y)["top1"] > 90
    for bad_bank, bad_query in ((torch.full_like(bank, float("nan")), query),
                                (bank, torch.cat([query[:10], torch.full_like(query[10:], float("inf"))]))):
        with pytest.warns(RuntimeWarning, match="not finite"):
            res = oknn.o_knn(bad_bank, bank_y, bad_query, query_y)
        assert math.isnan(res["top1"]) and math.isnan(res["top5"])


def test_two_splits_listing_the_same_images_are_refused(tiny_coco, capsys):
    """Two annotation files (not one file twice) whose images are the same files."""
    ann = json.loads((tiny_coco / "annotations" / "instances_train.json").read_text())
    for img in ann["images"]:
        img["file_name"] = os.path.join("..", "train", img["file_name"])
    (tiny_coco / "annotations" / "instances_copy.json").write_text(json.dumps(ann))
    (tiny_coco / "copy").mkdir()
    with pytest.raises(ValueError, match=r"3 image file\(s\) are in both the bank split 'train' and the query "
                                         r"split 'copy'"):
        oknn.evaluate_oknn(ResNetC4("resnet18"), str(tiny_coco), val_split="copy", image_size=64)
    # the tools: one line, no traceback, before any feature is extracted
    from d3ssl.eval import report
    with pytest.raises(SystemExit) as stop:
        oknn.main(["--random-init", "--arch", "resnet18", "--data", str(tiny_coco), "--val-split", "copy",
                   "--image-size", "64", "--no-progress"])
    assert stop.value.code == 2
    assert "error: 3 image file(s) are in both" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"^error: 3 image file\(s\) are in both"):
        report.main(["--arch", "resnet18", "--data", str(tiny_coco), "--val-split", "copy", "--image-size", "64",
                     "--out", str(tiny_coco / "report"), "--no-progress"])


def test_images_without_annotated_size_take_their_stored_size(tiny_coco):
    """width/height are optional in a COCO images entry: the position share then takes the file's
    size (as stored) for the box centres, and O-KNN runs through."""
    ann = tiny_coco / "annotations" / "instances_val.json"
    coco = json.loads(ann.read_text())
    for img in coco["images"]:
        del img["width"], img["height"]
    ann.write_text(json.dumps(coco))
    records = oknn.load_objects(str(tiny_coco), "val")
    assert [r[3] for r in records] == [None, None]
    np.testing.assert_allclose(oknn.object_centres(records).numpy(),
                               [[20 / 60, 20 / 60], [42.5 / 60, 35 / 60], [20 / 70, 20 / 50]])
    res = oknn.evaluate_oknn(ResNetC4("resnet18"), str(tiny_coco), image_size=64)
    assert res["num_queries"] == 3 and "position_share" in res


def _exif_jpeg(path, pixels, orientation):
    """A JPEG of `pixels` (RGB, as stored) with an EXIF orientation tag."""
    from PIL import Image
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, exif=exif.tobytes(), quality=100)


def test_boxes_land_on_their_objects_whatever_the_file_orientation_or_size(tmp_path):
    """COCO's boxes are in the pixels as stored; decoding turns a JPEG by its EXIF orientation. The
    image whose size matches the annotation is used; a resized copy gets its boxes scaled (with a
    warning); the object, white on black, must fill its box in the resized view either way."""
    from d3ssl.eval import probe
    stored = np.zeros((40, 80, 3), np.uint8)
    stored[:, :40] = 255                                     # the object: the left half, as stored
    _exif_jpeg(tmp_path / "turned.jpg", stored, 6)           # shown turned by 90 degrees
    assert cv2.imread(str(tmp_path / "turned.jpg")).shape[:2] == (80, 40)
    cv2.imwrite(str(tmp_path / "half.png"), cv2.resize(stored, (40, 20), interpolation=cv2.INTER_AREA))
    box = np.array([[0, 0, 40, 40]], np.float32)
    probe._warned_resized = False
    for name, warns in (("turned.jpg", False), ("half.png", True)):
        records = [(str(tmp_path / name), box, np.array([1]), (80, 40))]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            image, boxes, _ = oknn.ObjectImages(records, 64)[0]
        assert any("annotations are for 80x40" in str(w.message) for w in caught) == warns, name
        np.testing.assert_allclose(boxes.numpy(), [[0, 0, 32, 64]])
        px = image * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]
        assert px[:, 4:60, 2:29].min() > 0.9 and px[:, 4:60, 35:62].max() < 0.1, name
        obj = probe.GroundTruthObject(str(tmp_path / name), (0.0, 0.0, 40.0, 40.0), 1, (80, 40))
        crop = probe.crop_object(obj)
        assert crop.min() > 200 and crop.shape[:2] == ((40, 40) if name == "turned.jpg" else (20, 20))


@pytest.mark.parametrize("orientation,shape", [(3, (40, 80)), (6, (60, 60))])
def test_stored_pixels_win_when_both_decodes_have_the_annotated_size(tmp_path, orientation, shape):
    """A turn by 180 degrees (orientation 3), or by 90 degrees of a square image, keeps the size:
    the boxes are in the stored pixels, so those must be what is read, for the right size and a
    resized copy alike."""
    from d3ssl.eval import probe
    h, w = shape
    stored = np.zeros((h, w, 3), np.uint8)
    stored[: h // 2, : w // 2] = 255                        # the object: the top-left quarter as stored
    _exif_jpeg(tmp_path / "full.jpg", stored, orientation)
    assert cv2.imread(str(tmp_path / "full.jpg"))[: h // 4, : w // 4].max() < 50   # decoders do turn it
    small = cv2.resize(stored, (w // 2, h // 2), interpolation=cv2.INTER_AREA)
    _exif_jpeg(tmp_path / "small.jpg", small, orientation)
    probe._warned_resized = True                            # (the warning has its own test)
    for name, factor in (("full.jpg", 1.0), ("small.jpg", 0.5)):
        image, (sx, sy) = probe.read_annotated_rgb(str(tmp_path / name), (w, h))
        assert (sx, sy) == (factor, factor), name
        qh, qw = round(h * factor) // 2, round(w * factor) // 2
        assert image[: qh - 2, : qw - 2].min() > 200 and image[qh + 2:, qw + 2:].max() < 50, name
        obj = probe.GroundTruthObject(str(tmp_path / name), (0.0, 0.0, w / 2, h / 2), 1, (w, h))
        assert probe.crop_object(obj).mean() > 200, name


def test_cli_of_a_diverged_network_prints_not_finite_and_strict_json(tiny_coco, monkeypatch, capsys):
    nan = float("nan")
    monkeypatch.setattr(oknn, "evaluate_oknn", lambda *a, **k: {
        "top1": nan, "top5": nan, "bank_size": 7, "num_queries": 3, "position_share": nan})
    args = ["--random-init", "--arch", "resnet18", "--data", str(tiny_coco), "--no-progress"]
    oknn.main(args)
    out = capsys.readouterr().out
    assert "nan" not in out.lower() and "top-1 not finite%" in out and "diverged" in out
    oknn.main(args + ["--json"])
    res = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"printed {c}"))
    assert res["top1"] is None and res["position_share"] is None and res["bank_size"] == 7

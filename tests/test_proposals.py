import os
import warnings
import shutil

import cv2
import numpy as np
import pytest

from d3ssl.data.datasets import ImageFolder, open_dataset
from d3ssl.data.proposals import (ProposalConfig, ProposalStore, STATUS_UNREADABLE, default_store_path,
                                  ensure_proposals, filter_boxes, generate_proposals, main, write_store)
from d3ssl.data.synthetic import ensure_synthetic


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    return ensure_synthetic(str(tmp_path_factory.mktemp("syn")), seed=5, num_train=7, num_val=2,
                            image_size=(100, 150), workers=1)


@pytest.fixture(scope="module")
def images(synthetic_root, tmp_path_factory):
    """A folder of 7 real scenes (synthetic set, 100-150 px) in two sub-folders."""
    root = synthetic_root
    out = tmp_path_factory.mktemp("imgs")
    for i, name in enumerate(sorted(os.listdir(os.path.join(root, "train")))):
        dst = out / ("a" if i % 2 else "b") / name
        dst.parent.mkdir(exist_ok=True)
        shutil.copy(os.path.join(root, "train", name), dst)
    return str(out)


@pytest.fixture(scope="module")
def store_path(images, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("store") / "p.bin")
    generate_proposals(ImageFolder(images), out, max_side=128, workers=1, chunk_size=3, progress=False)
    return out


def _check_rules(boxes, w, h, cfg):
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    size = (bw >= cfg.min_size) & (bh >= cfg.min_size)
    ratio = (bw / bh >= 1 / cfg.max_aspect) & (bw / bh <= cfg.max_aspect)
    scale = np.sqrt(bw * bh / (w * h))
    return size, ratio, (scale >= cfg.min_scale) & (scale <= cfg.max_scale)


def test_store_contents_follow_the_filter(images, store_path):
    ds, store = ImageFolder(images), ProposalStore(store_path)
    cfg = ProposalConfig()
    store.check_matches(ds)
    assert store.keys == [ds.key(i) for i in range(len(ds))]
    for i in range(len(ds)):
        img = cv2.imread(ds.path(i))
        h, w = img.shape[:2]
        b = store.boxes(i)
        assert b.dtype == np.float32 and b.ndim == 2 and b.shape[1] == 4 and 1 <= len(b) <= cfg.max_boxes
        assert store.size(i) == (w, h) and store.status(i) == 0
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
        assert len(np.unique(b, axis=0)) == len(b)                       # no duplicates
        size, ratio, scale = _check_rules(b.astype(np.float64), w, h, cfg)
        # either every rule holds for every box, or (fallback) a reduced rule set does
        assert size.all() or (len(b) == 1 and tuple(b[0]) == (0, 0, w, h))
        # independent run of OpenCV's selective search: every stored box is one of its rectangles
        f = min(1.0, 128 / max(w, h))     # never upscaled
        small = cv2.resize(img, (round(w * f), round(h * f)), interpolation=cv2.INTER_AREA) if f < 1 else img
        ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
        ss.setBaseImage(small)
        ss.switchToSelectiveSearchFast()
        r = ss.process().astype(np.float64)
        sx, sy = w / small.shape[1], h / small.shape[0]
        ref = np.stack([r[:, 0] * sx, r[:, 1] * sy, np.minimum((r[:, 0] + r[:, 2]) * sx, w),
                        np.minimum((r[:, 1] + r[:, 3]) * sy, h)], 1)
        ok = size & ratio & scale
        refs_ok = np.all(_check_rules(ref, w, h, cfg), axis=0)
        if refs_ok.any():
            assert ok.all()
            expected = np.unique(ref[refs_ok].astype(np.float32), axis=0)
            if len(expected) <= cfg.max_boxes:
                np.testing.assert_allclose(np.unique(b, axis=0), expected, atol=1e-3)
            else:
                assert len(b) == cfg.max_boxes


def test_filter_fallbacks():
    cfg = ProposalConfig()
    w = h = 200
    good = [20, 20, 120, 120]            # scale 0.5, square
    huge = [0, 0, 200, 190]              # scale > 0.8
    thin = [0, 0, 150, 40]               # ratio 3.75
    tiny = [0, 0, 20, 20]
    b, lvl = filter_boxes(np.array([good, huge, thin, tiny]), w, h, cfg)
    assert lvl == 0 and b.tolist() == [good]
    b, lvl = filter_boxes(np.array([huge, thin, tiny]), w, h, cfg)
    assert lvl == 1 and b.tolist() == [huge]
    b, lvl = filter_boxes(np.array([thin, tiny]), w, h, cfg)
    assert lvl == 2 and b.tolist() == [thin]
    b, lvl = filter_boxes(np.array([tiny]), w, h, cfg)
    assert lvl == 3 and b.tolist() == [[0, 0, w, h]]
    b, lvl = filter_boxes(np.zeros((0, 4)), w, h, cfg)
    assert lvl == 3 and b.tolist() == [[0, 0, w, h]]


def test_resume_after_interruption_equals_uninterrupted_run(images, store_path, tmp_path):
    out = str(tmp_path / "p.bin")
    ds = ImageFolder(images)
    assert generate_proposals(ds, out, max_side=128, workers=1, chunk_size=3, progress=False,
                              stop_after_chunks=1) is None
    assert not os.path.exists(out) and len(os.listdir(out + ".partial")) == 2   # manifest + 1 chunk
    # a chunk file written halfway (killed while writing) is a temp file, never picked up
    open(os.path.join(out + ".partial", "chunk_0000001.bin.tmp-1"), "wb").write(b"partial")
    store = generate_proposals(ds, out, max_side=128, workers=2, chunk_size=3, progress=False)
    assert not os.path.exists(out + ".partial")
    assert open(out, "rb").read() == open(store_path, "rb").read()
    assert len(store) == len(ds)


def test_changed_settings_restart(images, tmp_path):
    out = str(tmp_path / "p.bin")
    ds = ImageFolder(images)
    generate_proposals(ds, out, max_side=128, workers=1, chunk_size=3, progress=False, stop_after_chunks=1)
    with pytest.warns(UserWarning, match="starting over"):
        store = generate_proposals(ds, out, max_side=96, workers=1, chunk_size=3, progress=False)
    assert store.params["max_side"] == 96


def test_many_unreadable_images_are_named_a_few_then_counted(tmp_path):
    """A folder of unreadable files: the first LISTED_FAILURES are named in warnings, the rest are
    counted in one more, not one warning per image."""
    from d3ssl.data import proposals
    root = tmp_path / "junk"
    root.mkdir()
    for i in range(9):
        (root / f"{i}.jpg").write_bytes(bytes(range(256)) * (i + 1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store = generate_proposals(ImageFolder(str(root)), str(tmp_path / "p.bin"), workers=1, progress=False)
    texts = [str(w.message) for w in caught]
    named = [t for t in texts if t.startswith("unreadable image, using the whole-image box")]
    assert len(named) == proposals.LISTED_FAILURES == 3
    assert [t for t in texts if "more unreadable" in t] == ["6 more unreadable image(s) (not listed one by one) "
                                                              "got the whole-image box"]
    assert len(texts) == 4 and store.params["unreadable"] == 9


def test_corrupt_image_gets_whole_image_box(images, tmp_path):
    root = tmp_path / "imgs"
    shutil.copytree(images, root)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    good = cv2.imread(os.path.join(images, "a", sorted(os.listdir(os.path.join(images, "a")))[0]))
    ok, buf = cv2.imencode(".jpg", good)
    (root / "truncated.jpg").write_bytes(buf.tobytes()[:len(buf) // 3])
    ds = ImageFolder(str(root))
    with pytest.warns(UserWarning, match="unreadable image"):
        store = generate_proposals(ds, str(tmp_path / "p.bin"), max_side=128, workers=1, progress=False)
    i = store.index_of("broken.jpg")
    assert store.status(i) == STATUS_UNREADABLE and store.boxes(i).tolist() == [[0, 0, 0, 0]]
    j = store.index_of("truncated.jpg")
    h, w = good.shape[:2]
    # either decoded partially by OpenCV, or unreadable with the size from its header
    if store.status(j) == STATUS_UNREADABLE:
        assert store.boxes(j).tolist() == [[0, 0, w, h]]
    assert store.params["unreadable"] >= 1
    others = [k for k in range(len(ds)) if ds.key(k) not in ("broken.jpg", "truncated.jpg")]
    assert all(store.status(k) == 0 for k in others)
    # the file fixed afterwards: the store's whole-image box for it is stale, and it says so
    n = store.params["unreadable"]
    assert store.readable_again(ds) == (None, n, n)
    (root / "broken.jpg").write_bytes(buf.tobytes())
    assert store.readable_again(ds)[0] == "broken.jpg"
    assert store.readable_again(ds, budget_s=0.0)[1] == 1          # (a time budget: one checked at least)


def test_a_pool_after_opencv_work_in_this_process_does_not_hang(images, tmp_path):
    """OpenCV's thread pool started in this process, then generation with forked workers: each
    worker had set OpenCV's thread count, which hangs in a forked child of such a parent. Run in a
    subprocess, so that a hang fails the test instead of the suite; the thread count is restored."""
    import subprocess
    import sys
    script = f"""
import cv2, numpy as np
from d3ssl.data.datasets import ImageFolder
from d3ssl.data.proposals import generate_proposals
big = np.random.default_rng(0).integers(0, 255, (2000, 2000, 3), dtype=np.uint8)
for _ in range(3):
    cv2.GaussianBlur(cv2.resize(big, (1000, 1000)), (0, 0), 3)   # OpenCV's pool is up
before = cv2.getNumThreads()
store = generate_proposals(ImageFolder({images!r}), {str(tmp_path / "p.bin")!r}, max_side=128, workers=2,
                           chunk_size=2, progress=False)
print(len(store), before == cv2.getNumThreads())
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["7", "True"]


def test_ctrl_c_ends_the_generation_in_one_line_and_keeps_its_chunks(tmp_path):
    """Ctrl-C reaches the whole process group: the pool's workers leave it to the tool, which
    ends in one line (no worker tracebacks) with status 130, and the same command goes on from the
    chunks kept."""
    import signal
    import subprocess
    import sys
    import time
    folder = tmp_path / "noise"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(48):   # noise: slow for selective search, so the run is still going when signalled
        cv2.imwrite(str(folder / f"{i:02d}.png"), rng.integers(0, 255, (200, 200, 3), dtype=np.uint8))
    out = tmp_path / "p.bin"
    cmd = [sys.executable, "-m", "d3ssl.data.proposals", "--images", str(folder), "--out", str(out),
           "--workers", "2", "--chunk-size", "2", "--max-side", "200"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    partial = tmp_path / "p.bin.partial"
    deadline = time.monotonic() + 120
    while not (partial.is_dir() and len(os.listdir(partial)) >= 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the generation ended before the signal")
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert f"interrupted: the chunks done so far are kept in {out}.partial/" in err
    kept = len(os.listdir(partial))
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and len(ProposalStore(str(out))) == 48 and kept >= 2


def test_an_opencv_without_selective_search_is_a_clear_error(images, tmp_path, monkeypatch, capsys):
    """Without OpenCV's contrib modules every image failed and the store was written with
    whole-image boxes, under warnings only; now nothing is written and the error says what to do."""
    monkeypatch.delattr(cv2, "ximgproc")
    out = tmp_path / "p.bin"
    with pytest.raises(ImportError, match="pip install opencv-contrib-python-headless"):
        generate_proposals(ImageFolder(images), str(out), workers=1, progress=False)
    with pytest.raises(SystemExit) as stop:
        main(["--images", images, "--out", str(out), "--workers", "1"])
    assert stop.value.code == 2 and "cv2.ximgproc" in capsys.readouterr().err
    assert not out.exists()


def test_a_failure_that_is_not_the_images_stops_the_generation(images, tmp_path, monkeypatch):
    """Only unreadable images get the whole-image box: any other error is raised, not recorded."""
    import d3ssl.data.proposals as proposals

    def broken(*args):
        raise TypeError("a bug")
    monkeypatch.setattr(proposals, "proposals_for_image", broken)
    with pytest.raises(TypeError, match="a bug"):
        generate_proposals(ImageFolder(images), str(tmp_path / "p.bin"), workers=1, progress=False)


def test_file_names_that_are_not_utf8_work_end_to_end(images, tmp_path):
    """A POSIX file name need not be UTF-8 (Latin-1 from an old archive): the store writes and
    reads its key back byte for byte, and the loader finds its proposals."""
    import torch
    from d3ssl.data import ViewConfig, make_loader
    root = tmp_path / "imgs"
    root.mkdir()
    src = sorted(os.path.join(images, "a", f) for f in os.listdir(os.path.join(images, "a")))
    for name, path in zip((b"a.jpg", b"caf\xe9.jpg"), src):
        shutil.copy(path, os.path.join(bytes(root), name))
    ds = ImageFolder(str(root))
    store = generate_proposals(ds, str(tmp_path / "p.bin"), max_side=128, workers=1, progress=False)
    assert store.keys == ds.keys == ["a.jpg", "caf\udce9.jpg"] and store.status(1) == 0
    store.check_matches(ds)
    loader = make_loader(ds, str(tmp_path / "p.bin"), batch_size=2, workers=0, view_cfg=ViewConfig(size=64),
                         shuffle=False)
    batch = next(iter(loader))
    assert sorted(batch.image_id.tolist()) == [0, 1] and torch.isfinite(batch.boxes1).all()


def test_cli_and_default_path(images, store_path, tmp_path, capsys):
    out = str(tmp_path / "cli.bin")
    main(["--images", images, "--out", out, "--max-side", "128", "--workers", "1", "--chunk-size", "3"])
    assert "wrote" in capsys.readouterr().out
    assert open(out, "rb").read() == open(store_path, "rb").read()
    assert default_store_path(ImageFolder(images)) == os.path.normpath(images) + ".proposals"


def test_cli_coco_and_ensure(synthetic_root, tmp_path):
    ann = os.path.join(synthetic_root, "annotations", "instances_val.json")
    main(["--coco", ann, "--workers", "1", "--max-side", "96"])
    ds = open_dataset(ann)
    path = default_store_path(ds)
    assert path == os.path.join(synthetic_root, "val.proposals") and os.path.isfile(path)
    store = ensure_proposals(ds)                         # exists: opened and checked, not regenerated
    assert store.params["max_side"] == 96 and len(store) == 2
    fresh = ensure_proposals(ds, str(tmp_path / "v.bin"), max_side=64, workers=1, progress=False)
    assert fresh.params["max_side"] == 64
    with pytest.raises(ValueError, match="does not match|images but"):
        ensure_proposals(open_dataset(synthetic_root, "train"), path)


def test_store_roundtrip_and_errors(tmp_path, images, store_path):
    p = str(tmp_path / "s.bin")
    boxes = [np.array([[1, 2, 3, 4]], np.float32), np.zeros((0, 4), np.float32),
             np.arange(12, dtype=np.float32).reshape(3, 4)]
    write_store(p, ["x.jpg", "dir/ü.png", "z.jpg"], boxes, np.array([[10, 20], [1, 1], [5, 6]]),
                np.array([0, 1, 0]))
    s = ProposalStore(p)
    assert len(s) == 3 and s.keys == ["x.jpg", "dir/ü.png", "z.jpg"] and s.num_boxes == 4
    for i in range(3):
        np.testing.assert_array_equal(s.boxes(i), boxes[i])
    assert s.size(2) == (5, 6) and s.status(1) == 1
    assert isinstance(s._boxes, np.memmap)
    import pickle
    s2 = pickle.loads(pickle.dumps(s))               # what a loader worker receives: the path only
    np.testing.assert_array_equal(s2.boxes(2), boxes[2])

    with pytest.raises(ValueError, match="has 3 images but the dataset has"):
        s.check_matches(ImageFolder(images))
    ds = ImageFolder(images)
    write_store(p, [ds.key(i) + "x" for i in range(len(ds))], [np.zeros((1, 4), np.float32)] * len(ds),
                np.ones((len(ds), 2)), np.zeros(len(ds)))
    with pytest.raises(ValueError, match="does not match the dataset"):
        ProposalStore(p).check_matches(ds)
    with pytest.raises(FileNotFoundError, match="python -m d3ssl.data.proposals"):
        ProposalStore(str(tmp_path / "none.bin"))
    (tmp_path / "junk.bin").write_bytes(b"0123456789abcdef")
    with pytest.raises(ValueError, match="not a d3ssl proposals store"):
        ProposalStore(str(tmp_path / "junk.bin"))

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from d3ssl.data.datasets import CocoDataset, ImageDecodeError, ImageFolder, decode_image, open_dataset


def _rgb(h=20, w=30, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save(path, arr, fmt=None, mode=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    im = Image.fromarray(arr)
    if mode:
        im = im.convert(mode)
    im.save(path, format=fmt)


def test_image_folder_recursive_and_formats(tmp_path):
    for rel, fmt in [("a.jpg", "JPEG"), ("sub/b.PNG", "PNG"), ("sub/deeper/c.bmp", "BMP"),
                     ("d.webp", "WEBP"), ("e.tif", "TIFF")]:
        _save(str(tmp_path / rel), _rgb(), fmt)
    (tmp_path / "notes.txt").write_text("not an image")
    _save(str(tmp_path / ".hidden" / "x.jpg"), _rgb(), "JPEG")
    ds = ImageFolder(str(tmp_path))
    assert [ds.key(i) for i in range(len(ds))] == ["a.jpg", "d.webp", "e.tif", "sub/b.PNG", "sub/deeper/c.bmp"]
    for i in range(len(ds)):
        assert ds.read_bytes(i) == open(ds.path(i), "rb").read()
        assert decode_image(ds.read_bytes(i)).shape == (20, 30, 3)
    assert isinstance(open_dataset(str(tmp_path)), ImageFolder)


def test_decode_grayscale_cmyk_png_named_jpeg_and_corrupt(tmp_path):
    arr = _rgb(seed=1)
    buf = io.BytesIO()
    Image.fromarray(arr).convert("L").save(buf, "JPEG", quality=95)
    gray = decode_image(buf.getvalue())
    assert gray.shape == (20, 30, 3) and np.array_equal(gray[..., 0], gray[..., 2])
    ref = np.asarray(Image.fromarray(arr).convert("L"), np.float32)
    assert np.abs(gray[..., 0].astype(np.float32) - ref).mean() < 4

    buf = io.BytesIO()
    Image.fromarray(arr).convert("CMYK").save(buf, "JPEG", quality=95)
    cmyk = decode_image(buf.getvalue())
    ref = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), np.float32)
    assert cmyk.shape == (20, 30, 3) and np.abs(cmyk.astype(np.float32) - ref).mean() < 6

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")        # a PNG, whatever its file is called
    assert np.array_equal(decode_image(buf.getvalue()), arr)       # RGB order, lossless
    assert np.array_equal(decode_image(buf.getvalue(), bgr=True), arr[..., ::-1])

    with pytest.raises(ImageDecodeError, match="cannot decode"):
        decode_image(b"\xff\xd8\xff\xe0 this is not a jpeg")
    with pytest.raises(ImageDecodeError):
        decode_image(b"")


def _coco(tmp_path, split="train", folder=None, n=3):
    folder = folder or split
    images = []
    for i in range(n):
        _save(str(tmp_path / folder / f"{i}.jpg"), _rgb(seed=i), "JPEG")
        images.append({"id": 10 - i, "file_name": f"{i}.jpg", "width": 30, "height": 20})
    ann = {"images": images, "categories": [{"id": 1, "name": "thing"}],
           "annotations": [{"id": 1, "image_id": 10, "category_id": 1, "bbox": [1, 2, 5, 6], "area": 30,
                            "iscrowd": 0}]}
    os.makedirs(tmp_path / "annotations", exist_ok=True)
    p = tmp_path / "annotations" / f"instances_{folder}.json"
    p.write_text(json.dumps(ann))
    return str(p)


def test_coco_root_and_json(tmp_path):
    ann = _coco(tmp_path, "train", "train2017")
    for ds in (open_dataset(str(tmp_path), "train"), open_dataset(ann), CocoDataset(str(tmp_path / "train2017"), ann)):
        assert isinstance(ds, CocoDataset) and len(ds) == 3
        # ordered by COCO id: ids 8, 9, 10 are files 2, 1, 0
        assert [ds.key(i) for i in range(3)] == ["2.jpg", "1.jpg", "0.jpg"]
        assert ds.image_id(2) == 10 and ds.size_hint(0) == (30, 20)
        assert len(ds.coco.getAnnIds(imgIds=10)) == 1
        assert os.path.isfile(ds.path(0))


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_dataset(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolder(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="contains no images"):
        open_dataset(str(tmp_path / "empty"))
    _coco(tmp_path / "c", "train")
    with pytest.raises(FileNotFoundError, match="instances_val"):
        open_dataset(str(tmp_path / "c"), "val")
    ann = _coco(tmp_path / "d", "train")
    os.rename(tmp_path / "d" / "train", tmp_path / "d" / "elsewhere")
    with pytest.raises(FileNotFoundError, match="image folder"):
        open_dataset(ann)
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="instances .json"):
        open_dataset(str(tmp_path / "x.txt"))

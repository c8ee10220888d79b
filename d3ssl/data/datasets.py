"""Image datasets: COCO-format (images + instances JSON) and plain image folders.

Every dataset has the same small interface (:class:`ImageDataset`): a length, a unique relative key
per image (used to match the proposals store), the file path and its bytes. Decoding is the loader's
job, so the DALI backend can decode the same bytes on the GPU.
"""
from __future__ import annotations

import contextlib
import io
import os
import warnings
from typing import Protocol, runtime_checkable

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".jpe", ".jp2",
                    ".pbm", ".pgm", ".ppm", ".pnm")


class ImageDecodeError(ValueError):
    """A file that is not a decodable image (corrupt, truncated, or an unknown format)."""


class UnreadableData(RuntimeError):
    """A loader met too many unreadable images (or batches) in a row to go on skipping them: the
    dataset's path or storage is likely wrong. (A RuntimeError, as torch's DataLoader re-raises a
    worker's exception with its type.)"""


def decode_image(data: bytes, bgr: bool = False):
    """Decodes encoded image bytes to uint8 [H,W,3], RGB (or BGR when `bgr`).

    OpenCV first: IMREAD_COLOR turns grayscale, CMYK and palette images into 3 channels, applies the
    EXIF orientation, and sniffs the format from the bytes, so a PNG named .jpg decodes too. PIL is
    the fallback for formats OpenCV lacks (e.g. GIF). Raises ImageDecodeError when neither can."""
    import cv2
    import numpy as np
    buf = np.frombuffer(data, np.uint8)
    img = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
    if img is not None:
        return img if bgr else cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    try:
        from PIL import Image
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                rgb = np.asarray(im.convert("RGB"))
    except Exception as e:  # noqa: BLE001  (PIL raises many types for bad files)
        raise ImageDecodeError(f"cannot decode image ({len(data)} bytes): {type(e).__name__}: {e}") from None
    return np.ascontiguousarray(rgb[:, :, ::-1]) if bgr else rgb


@runtime_checkable
class ImageDataset(Protocol):
    """What the proposals generator and the loaders need from a dataset."""

    def __len__(self) -> int: ...

    def key(self, i: int) -> str:
        """Unique relative path of image i (forward slashes); the proposals store is keyed by it."""

    def path(self, i: int) -> str: ...

    def read_bytes(self, i: int) -> bytes: ...


class _FileDataset:
    root: str
    _keys: list[str]

    def __len__(self) -> int:
        return len(self._keys)

    def key(self, i: int) -> str:
        return self._keys[i]

    @property
    def keys(self) -> list[str]:
        return self._keys

    def path(self, i: int) -> str:
        return os.path.join(self.root, *self._keys[i].split("/"))

    def read_bytes(self, i: int) -> bytes:
        with open(self.path(i), "rb") as f:
            return f.read()

    def size_hint(self, i: int) -> tuple[int, int] | None:
        """(width, height) when known without decoding, else None."""
        return None


class ImageFolder(_FileDataset):
    """Every image file under `root`, recursively, in sorted order of relative path.

    Extensions (case-insensitive): see IMAGE_EXTENSIONS. Hidden files and folders are skipped."""

    def __init__(self, root: str, extensions: tuple[str, ...] = IMAGE_EXTENSIONS):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder {root!r} does not exist (expected a folder of images)")
        self.root = os.path.abspath(root)
        keys = []
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            rel = os.path.relpath(dirpath, self.root)
            for name in filenames:
                if not name.startswith(".") and name.lower().endswith(extensions):
                    keys.append(name if rel == "." else f"{rel.replace(os.sep, '/')}/{name}")
        if not keys:
            raise ValueError(f"image folder {root!r} contains no images (looked recursively for "
                             f"{', '.join(extensions)})")
        self._keys = sorted(keys)

    def __repr__(self):
        return f"ImageFolder({self.root!r}, {len(self)} images)"


class CocoDataset(_FileDataset):
    """A COCO-format dataset: images under `root_images`, ground truth in `ann_file`.

    Images are ordered by COCO image id. ``self.coco`` is the pycocotools ``COCO`` object (ground truth
    for evaluation); ``image_id(i)`` gives the COCO id of image i."""

    def __init__(self, root_images: str, ann_file: str):
        if not os.path.isfile(ann_file):
            raise FileNotFoundError(f"annotation file {ann_file!r} does not exist "
                                    "(expected a COCO instances JSON)")
        if not os.path.isdir(root_images):
            raise FileNotFoundError(f"image folder {root_images!r} of {ann_file!r} does not exist")
        from pycocotools.coco import COCO
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco = COCO(ann_file)
        self.root = os.path.abspath(root_images)
        self.ann_file = os.path.abspath(ann_file)
        self._ids = sorted(self.coco.getImgIds())
        if not self._ids:
            raise ValueError(f"annotation file {ann_file!r} lists no images")
        self._keys = [self.coco.imgs[i]["file_name"] for i in self._ids]

    def image_id(self, i: int) -> int:
        return self._ids[i]

    def size_hint(self, i: int) -> tuple[int, int] | None:
        info = self.coco.imgs[self._ids[i]]
        if "width" in info and "height" in info:
            return int(info["width"]), int(info["height"])
        return None

    def __repr__(self):
        return f"CocoDataset({self.root!r}, {self.ann_file!r}, {len(self)} images)"


def open_dataset(path: str, split: str = "train") -> ImageDataset:
    """Opens a dataset from a path:

    - an instances JSON file: COCO dataset; images in the sibling folder of ``annotations/`` named
      after the file (``instances_train2017.json`` -> ``train2017/``) or such a folder next to it;
    - a COCO root: a folder with ``annotations/instances_{split}.json`` (or ``{split}2017``) and
      the images in ``{split}/`` or ``{split}2017/``;
    - any other folder: an :class:`ImageFolder`.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"dataset path {path!r} does not exist (expected a COCO root, an "
                                "instances JSON or a folder of images)")
    if os.path.isfile(path):
        if not path.endswith(".json"):
            raise ValueError(f"dataset path {path!r} is a file but not a COCO instances .json")
        ann_dir = os.path.dirname(os.path.abspath(path))
        stem = os.path.splitext(os.path.basename(path))[0]
        name = stem[len("instances_"):] if stem.startswith("instances_") else stem
        candidates = [os.path.join(os.path.dirname(ann_dir), name), os.path.join(ann_dir, name)]
        for images in candidates:
            if os.path.isdir(images):
                return CocoDataset(images, path)
        raise FileNotFoundError(f"no image folder found for {path!r}: looked for "
                                f"{candidates[0]!r} and {candidates[1]!r}")
    for name in (split, f"{split}2017"):
        ann = os.path.join(path, "annotations", f"instances_{name}.json")
        if os.path.isfile(ann):
            for images in (os.path.join(path, name), os.path.join(path, split),
                           os.path.join(path, f"{split}2017")):
                if os.path.isdir(images):
                    return CocoDataset(images, ann)
            raise FileNotFoundError(f"COCO root {path!r} has {ann!r} but no image folder "
                                    f"{split}/ or {split}2017/")
    if os.path.isdir(os.path.join(path, "annotations")):
        found = sorted(os.listdir(os.path.join(path, "annotations")))
        raise FileNotFoundError(f"COCO root {path!r} has no annotations/instances_{split}.json "
                                f"(found: {found}); pass split= one of them")
    return ImageFolder(path)

"""The embedded synthetic dataset: multi-object scenes with COCO-format ground truth.

Each image shows 3-10 objects (by default; `objects` and `object_frac` set the count and size) of different sizes on a textured background, some touching or
overlapping. There are 12 object classes; a class is a fixed pair (shape, texture), e.g. a star
filled with stripes or a ring filled with dots. Colours, orientation, texture frequency and phase are
drawn per instance, so colour never gives the class away: a network has to see both the outline and
the texture to tell the classes apart, which is the multi-object, region-level problem D3SSL targets.

Generation is deterministic from the seed (one NumPy generator per image, seeded by
(seed, split, index)), runs in a few seconds, and writes once into a cache folder::

    root/train/000000.jpg ...  root/val/000000.jpg ...
    root/annotations/instances_train.json, instances_val.json   (COCO format)

Annotations: ``bbox`` [x,y,w,h] in pixels of the visible part of the object, ``area`` = visible pixels,
``iscrowd`` = 0, ``segmentation`` = the bbox polygon. Objects mostly hidden by later ones are
avoided when placing them, so every annotated object is at least half visible.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor

import cv2
import numpy as np

VERSION = 2

# class id (1-based, COCO style) -> (name, shape, texture)
CLASSES = [
    ("striped_circle", "circle", "stripes"),
    ("checkered_square", "square", "checker"),
    ("dotted_triangle", "triangle", "dots"),
    ("ringed_star", "star", "rings"),
    ("gridded_hexagon", "hexagon", "grid"),
    ("wavy_cross", "cross", "waves"),
    ("speckled_ellipse", "ellipse", "speckle"),
    ("zigzag_diamond", "diamond", "zigzag"),
    ("dotted_ring", "ring", "dots_small"),
    ("striped_crescent", "crescent", "stripes_fine"),
    ("checkered_arrow", "arrow", "checker_diag"),
    ("plain_heart", "heart", "gradient"),
]
NUM_CLASSES = len(CLASSES)

MIN_OBJECTS, MAX_OBJECTS = 3, 10             # default objects per image
MIN_OBJECT_FRAC, MAX_OBJECT_FRAC = 0.14, 0.5   # default object side / shorter image side
MAX_HIDDEN = 0.5                               # most of an earlier object a new one may cover
JPEG_QUALITY = 90


def default_cache_root() -> str:
    return os.environ.get("D3SSL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "d3ssl")


# ---------------------------------------------------------------------------------------------------
# shapes: a filled uint8 mask of size s x s (the object's box), rotated by `angle` degrees

def _polygon(points, s):
    m = np.zeros((s, s), np.uint8)
    cv2.fillPoly(m, [np.round(points * (s - 1)).astype(np.int32)], 255, lineType=cv2.LINE_8)
    return m


def _regular(n, phase=0.0, inner=None):
    """Vertices of a regular n-gon (or an n-pointed star when `inner` radius is given) in [0,1]^2."""
    m = 2 * n if inner else n
    k = np.arange(m)
    r = np.where(k % 2 == 1, inner, 1.0) if inner else np.ones(m)
    a = phase + k * 2 * np.pi / m
    return np.stack([0.5 + 0.5 * r * np.cos(a), 0.5 + 0.5 * r * np.sin(a)], 1)


def _shape_mask(shape: str, s: int, rng: np.random.Generator) -> np.ndarray:
    if shape == "circle":
        m = np.zeros((s, s), np.uint8)
        cv2.circle(m, (s // 2, s // 2), s // 2 - 1, 255, -1)
    elif shape == "square":
        m = _polygon(np.array([[0.1, 0.1], [0.9, 0.1], [0.9, 0.9], [0.1, 0.9]]), s)
    elif shape == "triangle":
        m = _polygon(np.array([[0.5, 0.02], [0.98, 0.9], [0.02, 0.9]]), s)
    elif shape == "star":
        m = _polygon(_regular(5, -np.pi / 2, inner=0.42), s)
    elif shape == "hexagon":
        m = _polygon(_regular(6), s)
    elif shape == "cross":
        a, b = 0.33, 0.67
        m = _polygon(np.array([[a, 0], [b, 0], [b, a], [1, a], [1, b], [b, b], [b, 1], [a, 1], [a, b],
                               [0, b], [0, a], [a, a]]), s)
    elif shape == "ellipse":
        m = np.zeros((s, s), np.uint8)
        cv2.ellipse(m, (s // 2, s // 2), (s // 2 - 1, max(2, int(s * 0.28))), 0, 0, 360, 255, -1)
    elif shape == "diamond":
        m = _polygon(np.array([[0.5, 0], [0.8, 0.5], [0.5, 1], [0.2, 0.5]]), s)
    elif shape == "ring":
        m = np.zeros((s, s), np.uint8)
        cv2.circle(m, (s // 2, s // 2), s // 2 - 1, 255, -1)
        cv2.circle(m, (s // 2, s // 2), int(s * 0.25), 0, -1)
    elif shape == "crescent":
        m = np.zeros((s, s), np.uint8)
        cv2.circle(m, (s // 2, s // 2), s // 2 - 1, 255, -1)
        cv2.circle(m, (int(s * 0.72), s // 2), int(s * 0.4), 0, -1)
    elif shape == "arrow":
        m = _polygon(np.array([[0, 0.35], [0.55, 0.35], [0.55, 0.1], [1, 0.5], [0.55, 0.9], [0.55, 0.65],
                               [0, 0.65]]), s)
    elif shape == "heart":
        t = np.linspace(0, 2 * np.pi, 64)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        p = np.stack([(x + 17) / 34, (y + 18) / 34], 1)
        m = _polygon(p, s)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    angle = rng.uniform(-180, 180)
    rot = cv2.getRotationMatrix2D(((s - 1) / 2, (s - 1) / 2), angle, 1.0)
    return cv2.warpAffine(m, rot, (s, s), flags=cv2.INTER_NEAREST)


# ---------------------------------------------------------------------------------------------------
# textures: a float map in [0,1] of size s x s, mixed between two instance colours

def _texture(kind: str, s: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    th = rng.uniform(0, np.pi)
    u = xx * np.cos(th) + yy * np.sin(th)
    v = -xx * np.sin(th) + yy * np.cos(th)
    ph = rng.uniform(0, 2 * np.pi)
    if kind in ("stripes", "stripes_fine"):
        period = rng.uniform(5, 8) if kind == "stripes" else rng.uniform(2.5, 3.5)
        t = (np.sin(2 * np.pi * u / period + ph) > 0).astype(np.float32)
    elif kind in ("checker", "checker_diag"):
        cell = rng.uniform(4, 7)
        if kind == "checker":
            u, v = xx, yy
        t = ((np.floor(u / cell) + np.floor(v / cell)) % 2).astype(np.float32)
    elif kind in ("dots", "dots_small"):
        cell = rng.uniform(7, 10) if kind == "dots" else rng.uniform(4, 5.5)
        du = (u / cell + ph) % 1 - 0.5
        dv = (v / cell) % 1 - 0.5
        t = ((du * du + dv * dv) < 0.09).astype(np.float32)
    elif kind == "rings":
        c = s / 2 + rng.uniform(-s / 8, s / 8, 2)
        r = np.sqrt((xx - c[0]) ** 2 + (yy - c[1]) ** 2)
        t = (np.sin(2 * np.pi * r / rng.uniform(4, 6) + ph) > 0).astype(np.float32)
    elif kind == "grid":
        cell = rng.uniform(6, 9)
        t = (((u % cell) < 1.6) | ((v % cell) < 1.6)).astype(np.float32)
    elif kind == "waves":
        period = rng.uniform(6, 9)
        t = (np.sin(2 * np.pi * (u + 2.5 * np.sin(2 * np.pi * v / 10)) / period + ph) > 0)
        t = t.astype(np.float32)
    elif kind == "speckle":
        t = (rng.random((s, s)) > 0.5).astype(np.float32)
        t = cv2.GaussianBlur(t, (3, 3), 0.6)
    elif kind == "zigzag":
        period = rng.uniform(6, 9)
        tri = np.abs((v / 8) % 2 - 1) * 5
        t = (((u + tri) % period) < period / 2).astype(np.float32)
    elif kind == "gradient":
        t = np.clip(u / max(s, 1) + rng.uniform(-0.3, 0.3), 0, 1).astype(np.float32)
    else:
        raise ValueError(f"unknown texture {kind!r}")
    return t


def _random_colour(rng):
    return rng.uniform(0, 255, 3).astype(np.float32)


def _noise(rng, shape, amplitude):
    """Zero-mean uniform pixel noise in [-amplitude, amplitude], float32 (much cheaper than normal)."""
    noise = rng.random(shape, dtype=np.float32)
    noise -= 0.5
    noise *= 2 * amplitude
    return noise


def _background(h, w, rng):
    """Low-frequency coloured noise plus a few random lines: textured, but unlike any object class."""
    small = rng.uniform(0, 255, (max(2, h // 24), max(2, w // 24), 3)).astype(np.float32)
    bg = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    base = _random_colour(rng)
    bg = np.clip(0.55 * bg + 0.45 * base, 0, 255)
    bg += _noise(rng, (h, w, 3), 8.0)
    for _ in range(int(rng.integers(2, 7))):
        p1 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        p2 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        cv2.line(bg, p1, p2, tuple(float(c) for c in _random_colour(rng)), int(rng.integers(1, 3)), cv2.LINE_AA)
    return bg


def render_image(rng: np.random.Generator, width: int, height: int,
                 objects: tuple[int, int] = (MIN_OBJECTS, MAX_OBJECTS),
                 object_frac: tuple[float, float] = (MIN_OBJECT_FRAC, MAX_OBJECT_FRAC)):
    """One scene with objects[0]..objects[1] objects (fewer when they do not fit), each of side
    object_frac * the shorter image side. Returns (uint8 BGR [H,W,3], list of
    (class_id, x, y, w, h, visible_area))."""
    img = _background(height, width, rng)
    owner = np.zeros((height, width), np.int16)     # which object (1-based) owns each pixel
    full_areas, visible, classes, placed = [], [], [], []
    n = int(rng.integers(objects[0], objects[1] + 1))
    short = min(width, height)
    for _ in range(n):
        cls = int(rng.integers(NUM_CLASSES))
        _, shape, tex = CLASSES[cls]
        for _attempt in range(10):
            s = int(short * rng.uniform(*object_frac))
            s = max(s, 12)
            x0 = int(rng.integers(-s // 6, width - s + s // 6 + 1))
            y0 = int(rng.integers(-s // 6, height - s + s // 6 + 1))
            mask = _shape_mask(shape, s, rng) > 0
            # clip the object's box to the image
            ax0, ay0 = max(x0, 0), max(y0, 0)
            ax1, ay1 = min(x0 + s, width), min(y0 + s, height)
            m = mask[ay0 - y0:ay1 - y0, ax0 - x0:ax1 - x0]
            if m.sum() < 0.6 * mask.sum():
                continue
            under = owner[ay0:ay1, ax0:ax1][m]
            ok = True
            if under.any():
                ids, counts = np.unique(under[under > 0], return_counts=True)
                for j, c in zip(ids, counts):
                    if visible[j - 1] - c < (1 - MAX_HIDDEN) * full_areas[j - 1]:
                        ok = False
                        break
            if not ok:
                continue
            t = _texture(tex, s, rng)[ay0 - y0:ay1 - y0, ax0 - x0:ax1 - x0]
            c1, c2 = _random_colour(rng), _random_colour(rng)
            if np.abs(c1 - c2).sum() < 120:    # keep the texture visible
                c2 = 255 - c1
            patch = c1 * t[..., None] + c2 * (1 - t[..., None])
            region = img[ay0:ay1, ax0:ax1]
            region[m] = patch[m]
            if under.any():
                for j, c in zip(ids, counts):
                    visible[j - 1] -= int(c)
            owner[ay0:ay1, ax0:ax1][m] = len(full_areas) + 1
            full_areas.append(int(m.sum()))
            visible.append(int(m.sum()))
            classes.append(cls + 1)
            placed.append((ax0, ay0, ax1, ay1))
            break
    img = cv2.GaussianBlur(img, (3, 3), 0.5)       # soften aliasing, as a camera would
    img = np.clip(img + _noise(rng, img.shape, 4.0), 0, 255).astype(np.uint8)
    objects = []
    for j, (cls, (ax0, ay0, ax1, ay1)) in enumerate(zip(classes, placed), start=1):
        ys, xs = np.nonzero(owner[ay0:ay1, ax0:ax1] == j)     # an object only ever owns pixels of its box
        if len(xs) == 0:
            continue
        xs, ys = xs + ax0, ys + ay0
        x, y = int(xs.min()), int(ys.min())
        objects.append((cls, x, y, int(xs.max()) + 1 - x, int(ys.max()) + 1 - y, int(len(xs))))
    return img, objects


def _render_to_file(job):
    seed, split_id, index, size_range, objects, object_frac, out_path = job
    rng = np.random.default_rng([seed, split_id, index])
    w = int(rng.integers(size_range[0], size_range[1] + 1))
    h = int(rng.integers(size_range[0], size_range[1] + 1))
    img, objects = render_image(rng, w, h, objects, object_frac)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RuntimeError(f"could not encode {out_path}")
    with open(out_path, "wb") as f:
        f.write(buf.tobytes())
    return w, h, objects


def _size_range(image_size):
    if isinstance(image_size, int):
        return (image_size, image_size)
    lo, hi = image_size
    if not (8 <= lo <= hi):
        raise ValueError(f"image_size must be an int or (min, max) with 8 <= min <= max, got {image_size}")
    return (int(lo), int(hi))


def _generate_split(tmp_root, split, split_id, seed, count, size_range, objects, object_frac, pool):
    os.makedirs(os.path.join(tmp_root, split))
    jobs = [(seed, split_id, i, size_range, objects, object_frac, os.path.join(tmp_root, split, f"{i:06d}.jpg"))
            for i in range(count)]
    results = pool.map(_render_to_file, jobs, chunksize=32) if pool else map(_render_to_file, jobs)
    images, annotations = [], []
    for i, (w, h, objects) in enumerate(results):
        images.append({"id": i + 1, "file_name": f"{i:06d}.jpg", "width": w, "height": h})
        for cls, x, y, bw, bh, area in objects:
            annotations.append({
                "id": len(annotations) + 1, "image_id": i + 1, "category_id": cls,
                "bbox": [x, y, bw, bh], "area": area, "iscrowd": 0,
                "segmentation": [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]],
            })
    categories = [{"id": i + 1, "name": name, "supercategory": shape}
                  for i, (name, shape, _) in enumerate(CLASSES)]
    ann = {"info": {"description": f"d3ssl synthetic v{VERSION} seed {seed} {split}"},
           "images": images, "annotations": annotations, "categories": categories}
    with open(os.path.join(tmp_root, "annotations", f"instances_{split}.json"), "w") as f:
        json.dump(ann, f)


def ensure_synthetic(root: str | None = None, seed: int = 0, num_train: int = 2000, num_val: int = 300,
                     image_size: int | tuple[int, int] = (160, 224),
                     objects: tuple[int, int] = (MIN_OBJECTS, MAX_OBJECTS),
                     object_frac: tuple[float, float] = (MIN_OBJECT_FRAC, MAX_OBJECT_FRAC),
                     workers: int | None = None) -> str:
    """Generates the synthetic dataset once and returns its folder.

    Args:
        root: parent folder (default: ``$D3SSL_CACHE`` or ``~/.cache/d3ssl``); the data go into a
            subfolder named by version, seed, counts and size, so different settings never collide.
        seed: everything (layouts, colours, textures) is a function of it.
        num_train, num_val: number of images per split.
        image_size: side length in pixels, or (min, max): width and height are drawn per image.
        objects: (min, max) objects per image; fewer are placed when they do not fit.
        object_frac: (min, max) object side as a fraction of the shorter image side.
        workers: processes used to render (default: all cores).

    Returns the dataset root (``root/train``, ``root/val``, ``root/annotations``). Safe when
    interrupted or run concurrently: it renders into a temporary folder and renames it at the end.
    """
    if num_train < 1 or num_val < 0:
        raise ValueError(f"num_train must be >= 1 and num_val >= 0, got {num_train}, {num_val}")
    size_range = _size_range(image_size)
    objects, object_frac = (int(objects[0]), int(objects[1])), (float(object_frac[0]), float(object_frac[1]))
    if not 1 <= objects[0] <= objects[1]:
        raise ValueError(f"objects must be (min, max) with 1 <= min <= max, got {objects}")
    if not 0 < object_frac[0] <= object_frac[1] <= 1:
        raise ValueError(f"object_frac must be (min, max) with 0 < min <= max <= 1, got {object_frac}")
    parent = root or default_cache_root()
    name = f"synthetic-v{VERSION}-seed{seed}-n{num_train}-{num_val}-s{size_range[0]}-{size_range[1]}"
    if (objects, object_frac) != ((MIN_OBJECTS, MAX_OBJECTS), (MIN_OBJECT_FRAC, MAX_OBJECT_FRAC)):
        name += f"-o{objects[0]}-{objects[1]}-f{object_frac[0]:g}-{object_frac[1]:g}"
    final = os.path.join(parent, name)
    if os.path.isfile(os.path.join(final, "annotations", "instances_val.json")):
        return final
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    try:
        os.makedirs(os.path.join(tmp, "annotations"))
        workers = workers or os.cpu_count() or 1
        pool = ProcessPoolExecutor(workers) if workers > 1 else None
        try:
            _generate_split(tmp, "train", 0, seed, num_train, size_range, objects, object_frac, pool)
            _generate_split(tmp, "val", 1, seed, num_val, size_range, objects, object_frac, pool)
        finally:
            if pool:
                pool.shutdown()
        try:
            os.rename(tmp, final)
        except OSError:
            # another process finished first: keep its copy
            if not os.path.isfile(os.path.join(final, "annotations", "instances_val.json")):
                raise
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return final
